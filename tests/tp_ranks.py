"""A rank of a 2-rank gloo group for tests/test_tp.py: runs random schedules of a tensor-parallel
preset (with or without sequence parallelism) and checks each against the sequential TP run and
the unsharded layer."""
from __future__ import annotations

import datetime
import json
import sys

import optuna
import torch
import torch.distributed as dist

from dynaflow.runtime import Executor, Schedule, ScheduledModule, Workload
from dynaflow.runtime.counters import count
from dynaflow.runtime.measure import Tolerance
from dynaflow.search_spaces import SpaceContext, get_space
from dynaflow.runtime.hardware import detect


def run(rank: int, world: int, rendezvous: str, out: str, models: list[str], schedules: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    report = {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in models:  # "<preset>" or "<preset>+sp" (sequence parallel)
        model, _, sp = name.partition("+")
        batch = dict(model=model, num_decode=7, context_len=12, prefill_tokens=16, prefill_chunk=4)
        ex = Executor(Workload(**batch, tp=world, sequence_parallel=sp == "sp").build())
        reference = ex.reference().clone()
        flat = Executor(Workload(**batch).build())  # the unsharded layer, same seed
        unsharded = flat.reference()
        _, counts = count(flat.case.model, *flat.case.inputs)
        tol = Tolerance.derive(torch.float32, reduction=counts.max_reduction, depth=flat.graph.depth, reference=unsharded)
        ex.profile_ops(flops_per_byte=4.0)
        proposals = _proposals(ex, schedules) if rank == 0 else None
        box = [proposals]
        dist.broadcast_object_list(box, src=0)  # every rank runs the schedules rank 0 proposed
        errors = []
        for d in box[0]:
            s = Schedule.from_dict(d)
            compiled = ex.compile(s)
            out1 = compiled().clone()
            errors.append({"label": s.label, "streams": len(s.streams), "nano": s.num_nano,
                           "vs_sequential": tol.error(out1, reference), "vs_unsharded": tol.error(out1, unsharded),
                           "network_streams": sorted({st.stream for st in s.order
                                                      if ex.graph.op(st.op).resource == "network"})})
            compiled.close()
        served = []  # the serving path (ScheduledModule, as a TP rank's server runs it) under the same schedules
        for d in box[0][:5]:
            layer = ScheduledModule(ex.case.model, lambda layout, s=Schedule.from_dict(d): s)
            with torch.no_grad():
                served.append(tol.error(layer(*ex.case.inputs), reference))
        report[name] = {"sequential_vs_unsharded": tol.error(reference, unsharded), "schedules": errors,
                        "served": served,
                         "ops": [(op.name, str(op.resource), op.bytes) for op in ex.graph.ops]}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def _proposals(ex: Executor, n: int) -> list[dict]:
    """n distinct split schedules from the nanoflow and dbo spaces (random sampler)."""
    ctx = SpaceContext(hardware=detect("cpu"), graph=ex.graph, layout=ex.case.layout)
    out, seen = [], set()
    for space in ("nanoflow", "dbo"):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
        for _ in range(20 * n):
            if len(out) >= n * (1 if space == "dbo" else 0.7):
                break
            s = get_space(space)(study.ask(), ctx)
            if s.num_nano > 1 and s.key() not in seen:
                seen.add(s.key())
                out.append(s.to_dict())
    return out


if __name__ == "__main__":
    rank, world, rendezvous, out, schedules = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    run(rank, world, rendezvous, out, sys.argv[6].split(","), schedules)
