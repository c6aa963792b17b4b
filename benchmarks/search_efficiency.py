"""How many trials TPE, random and grid search need to come within 2% (and 0.5%, and all the way)
of the exhaustive optimum, on a deterministic landscape: the nanoflow space (on a finite grid of
its parameters) at llama3-8b dimensions, each schedule's latency from benchmarks/costmodel.py.

    python benchmarks/search_efficiency.py [--workload d256x2048+p512] [--seeds 5]

Target: TPE within 5% of the grid's size. Prints the grid size, the optimum, and per target and
sampler the median trials (over seeds) to reach it, as a fraction of the grid size.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from costmodel import op_cost, simulate  # noqa: E402

from dynaflow.runtime import BatchLayout, Executor, Hardware, Op, OpGraph, Workload  # noqa: E402
from dynaflow.search_spaces import SpaceContext, get_space  # noqa: E402
from dynaflow.tuner.workloads import parse_workload  # noqa: E402

H100 = Hardware(kind="cuda", name="NVIDIA H100 80GB HBM3", arch="9.0", num_sms=132, memory_bytes=80 * 2**30)
GRID = {"num_nano": [1, 2, 3], "weight_0": [1, 2, 3], "weight_1": [1, 2, 3], "weight_2": [1, 2, 3],
        "streams": ["one", "compute|rest", "compute|memory|copy", "per-nano"], "stagger": [0, 1, 2, 4],
        "partition": [False, True], "sm_steps_0": [4, 8, 12], "sm_steps_1": [4, 8, 12], "sm_steps_2": [4, 8, 12],
        "prioritise_memory": [False], "cuda_graph": [False]}


class OnGrid:
    """Restricts a trial's suggestions to GRID's values, so every sampler searches the same finite space."""

    def __init__(self, trial) -> None:
        self.trial = trial

    def suggest_int(self, name, low, high):
        return self.trial.suggest_categorical(name, GRID[name])

    def suggest_categorical(self, name, choices):
        return self.trial.suggest_categorical(name, GRID[name])


def context(w: Workload) -> SpaceContext:
    """Op names and dependencies traced from the tiny preset; resources and costs at full size."""
    tiny = Executor(Workload(model="llama-tiny", num_decode=2, context_len=4, prefill_tokens=4).build()).graph
    ops = []
    for op in tiny.ops:
        cost = op_cost(op.name, w.model, w.num_decode, w.context_len, w.num_prefill, w.chunk)
        resource = "copy" if cost.flops == 0 and cost.bytes == 0 else cost.resource
        ops.append(Op(name=op.name, deps=op.deps, flops=cost.flops, bytes=cost.bytes, resource=resource))
    layout = BatchLayout(request_tokens=(1,) * w.num_decode + (w.chunk,) * w.num_prefill,
                         request_kinds=("decode",) * w.num_decode + ("prefill",) * w.num_prefill,
                         input_axes=(), kinds=("decode", "prefill"))
    return SpaceContext(hardware=H100, graph=OpGraph(ops=tuple(ops), module=tiny.module, writes_output=True),
                        layout=layout)


class Landscape:
    def __init__(self, w: Workload) -> None:
        self.w, self.ctx, self.space = w, context(w), get_space("nanoflow")
        self.deps = {op.name: op.deps for op in self.ctx.graph.ops}
        self.cache: dict[str, float] = {}

    def latency(self, trial) -> float:
        schedule = self.space(OnGrid(trial), self.ctx)
        key = schedule.to_json()
        if key not in self.cache:
            self.cache[key] = simulate(schedule, self.ctx.graph.names, self.deps, self.ctx.layout,
                                       self.w.model, self.w.context_len)
        return self.cache[key]


def exhaustive(land: Landscape) -> tuple[float, float, int]:
    names = list(GRID)
    points = list(itertools.product(*GRID.values()))
    lat = [land.latency(optuna.trial.FixedTrial(dict(zip(names, p)))) for p in points]
    sequential = land.latency(optuna.trial.FixedTrial({"num_nano": 1, "weight_0": 1, "streams": "one", "stagger": 0,
                                                       "prioritise_memory": False, "cuda_graph": False}))
    return min(lat), sequential, len(points)


TARGETS = {"within 2%": 0.02, "within 0.5%": 0.005, "to the optimum": 0.0}


def trials_to_reach(land: Landscape, sampler, target: float, limit: int) -> int:
    study = optuna.create_study(sampler=sampler, direction="minimize")
    for n in range(1, limit + 1):
        trial = study.ask()
        value = land.latency(trial)
        study.tell(trial, value)
        if value <= target:
            return n
    return limit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--workload", default="d256x2048+p512")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    w = parse_workload(args.workload, model=args.model, dtype="bfloat16", device="cpu")
    land = Landscape(w)
    t0 = time.perf_counter()
    best, sequential, size = exhaustive(land)
    print(f"{w.key}: grid of {size:,} points ({len(land.cache):,} distinct schedules), exhaustive in "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"sequential {sequential * 1e3:.3f} ms, optimum {best * 1e3:.3f} ms ({sequential / best:.3f}x)")
    samplers = {"tpe": lambda s: optuna.samplers.TPESampler(seed=s),
                "random": lambda s: optuna.samplers.RandomSampler(seed=s),
                "grid": lambda s: optuna.samplers.GridSampler(GRID, seed=s)}
    limit = size // 20  # the target: 5% of the grid; a sampler that needs more is reported at the cap
    for label, within in TARGETS.items():
        target = best / (1 - within) * (1 + 1e-12)  # within x of the optimum's tokens/s
        reach = sum(v <= target for v in land.cache.values())
        print(f"\nto come {label} ({reach} distinct schedule(s) qualify); per seed, capped at {limit}")
        print(f"{'sampler':<8} {'median trials':>14} {'of grid':>9}   per seed")
        for name, make in samplers.items():
            runs = [trials_to_reach(land, make(s), target, limit) for s in range(args.seeds)]
            med = statistics.median(runs)
            print(f"{name:<8} {med:>14.0f} {med / size:>9.2%}   {runs}")
    print("\ntarget: TPE's median within 5% of the grid's size (for coming within 2%)")


if __name__ == "__main__":
    main()
