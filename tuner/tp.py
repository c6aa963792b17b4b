"""Trials on a tensor-parallel group: one process per rank on this node, driven from the tuner.

    target = TPTarget(workload, config)   # starts workload.tp rank processes (gloo on CPU, NCCL on CUDA)
    target.measure(schedule)              # every rank measures it; rank 0's measurement reports

Each rank builds its shard of the workload and a Bench on it (runtime/measure.py); the driver
sends every rank the same command, so all run the same schedule in lockstep through their
collectives (runtime/parallel.py). Rank 0's measurement is the trial's, unless another rank's
failed: then the first failing rank's, named. A rank that dies, or a group that does not answer
within the collective timeout and a grace after a failure (a hung collective), makes the trial
CRASHED or TIMEOUT with `killed_worker` set; the group is then replaced, as is one whose
collectives failed (its ranks may no longer be in step), before the next trial. Trials time fully:
pruning needs the study, which lives in the driver (as with Ray actors).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from multiprocessing.connection import wait

from dynaflow.runtime import Measurement, MeasureConfig, Schedule, TrialOutcome, Workload
from dynaflow.search_spaces import SpaceContext

GRACE_S = 10.0  # after a failing rank's answer (or a trial's limit), before the others are declared hung
START_TIMEOUT_S = 900.0  # building the shards and their references
RESTARTS = {TrialOutcome.CRASHED, TrialOutcome.TIMEOUT, TrialOutcome.OOM}  # the ranks may be out of step after these


class GroupFailed(RuntimeError):
    """The group cannot answer: a rank died or hung (the measurement says which)."""

    def __init__(self, measurement: Measurement, answers: dict | None = None) -> None:
        super().__init__(measurement.message)
        self.measurement = measurement
        self.answers = answers or {}  # what the other ranks answered before it failed


def _rank_main(rank: int, world: int, rendezvous: str, workload: Workload, config: MeasureConfig, conn) -> None:
    """A rank's process: join the group, build its shard's Bench, answer the driver's commands."""
    try:
        _serve_rank(rank, world, rendezvous, workload, config, conn)
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # Ctrl-C, or the driver is gone: leave quietly
        os._exit(1)


def _serve_rank(rank, world, rendezvous, workload, config, conn) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from dynaflow.runtime import Bench, parallel, telemetry
    from dynaflow.runtime.graph import OpGraph

    if rank > 0:
        warnings.simplefilter("ignore")  # rank 0 says it once
    else:
        from .errors import one_line

        warnings.formatwarning = one_line
    cuda = workload.device.startswith("cuda")
    if cuda:  # rank r on cuda:r
        if torch.cuda.device_count() < world:
            conn.recv()
            conn.send(("error", f"--tp {world} needs {world} CUDA devices (one per rank), but torch sees "
                                f"{torch.cuda.device_count()}."))
            return
        torch.cuda.set_device(rank)
    else:  # ranks share the machine's cores, as vLLM's CPU workers do
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    telemetry.count_as_own(conn.recv())  # the other ranks' pids: their work is not contention
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=config.collective_timeout_s),
                            **({"device_id": torch.device(f"cuda:{rank}")} if cuda else {}))
    parallel.current(timeout_s=config.collective_timeout_s)
    w = dataclasses.replace(workload, device=f"cuda:{rank}" if cuda else workload.device)
    try:
        bench = Bench(w, config=config)
    except Exception as e:  # noqa: BLE001 - the workload cannot be built here: one line to the driver
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    graph = bench.executor.graph
    conn.send(("ready", None if rank else {
        "hardware": bench.hardware, "peaks": bench.peaks, "tolerance": bench.tolerance, "layout": bench.case.layout,
        "graph": OpGraph(ops=graph.ops, module=None, writes_output=graph.writes_output)}))
    while True:
        command, schedule, limit = conn.recv()
        if command == "close":
            break
        try:
            answer = bench.measure(schedule, time_limit_s=limit) if command == "measure" else bench.explain(schedule)
            conn.send(("ok", answer))
        except Exception as e:  # noqa: BLE001 - explain failed: the driver says so
            conn.send(("error", f"{type(e).__name__}: {e}"))
    dist.destroy_process_group()


class TPTarget:
    """A workload at tensor parallelism `workload.tp`, measured on that many rank processes."""

    def __init__(self, workload: Workload, config: MeasureConfig) -> None:
        self.workload, self.config = workload, config
        self.ranks: list = []
        self.conns: list = []
        self.folder: str | None = None
        info = self._start()
        self.hardware, self.graph = info["hardware"], info["graph"]
        self.peaks, self.tolerance = info["peaks"], info["tolerance"]
        self.context = SpaceContext(hardware=self.hardware, graph=self.graph, layout=info["layout"])

    def space_context(self) -> SpaceContext:
        return self.context

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        """`on_sample` is not forwarded: pruning needs the driver's study (trials time fully)."""
        try:
            answers = self._run(("measure", schedule, time_limit_s), time_limit_s)
        except GroupFailed as e:
            return e.measurement
        failed = [(r, m) for r, m in enumerate(answers) if not (isinstance(m, Measurement) and m.ok)]
        if not failed:
            return answers[0]
        rank, m = failed[0]
        if not isinstance(m, Measurement):
            m = Measurement(outcome=TrialOutcome.CRASHED, message=str(m))
        if any(isinstance(a, Measurement) and a.outcome in RESTARTS for a in answers):
            self.close()  # its collectives failed: start a fresh group for the next trial
            m = dataclasses.replace(m, killed_worker=True)
        return dataclasses.replace(m, message=f"rank {rank}: {m.message}") if rank else m

    def explain(self, schedule: Schedule) -> dict | None:
        try:
            answers = self._run(("explain", schedule, None), None)
        except GroupFailed as e:
            raise RuntimeError(e.measurement.message) from None
        if not isinstance(answers[0], dict):
            raise RuntimeError(str(answers[0]))
        return answers[0]

    def close(self) -> None:
        """Stop the ranks (asked first, then killed), and remove the rendezvous folder."""
        for conn in self.conns:
            try:
                conn.send(("close", None, None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for p in self.ranks:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for conn in self.conns:
            conn.close()
        self.ranks, self.conns = [], []
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __del__(self) -> None:
        if self.ranks:
            self.close()

    # --- the group --------------------------------------------------------------------------

    def _start(self) -> dict:
        """Start the ranks and wait until each has built its shard; rank 0's description back."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch state
        self.folder = tempfile.mkdtemp(prefix="dynaflow-tp-")
        rendezvous = os.path.join(self.folder, "rendezvous")
        world = self.workload.tp
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(rank, world, rendezvous, self.workload, self.config, theirs),
                            name=f"dynaflow-tp-rank{rank}", daemon=True)
            p.start()
            theirs.close()
            self.ranks.append(p)
            self.conns.append(mine)
        for conn in self.conns:
            conn.send([p.pid for p in self.ranks])
        try:
            answers = self._collect(time.monotonic() + START_TIMEOUT_S, after_failure_s=GRACE_S,
                                    what="building the shards")
        except GroupFailed as e:
            self.close()
            errors = [a for a in e.answers.values() if isinstance(a, str)]
            if errors:  # a rank could not build its shard (and left the others waiting): its reason
                raise ValueError(errors[0]) from None
            raise RuntimeError(f"the tp={world} group did not start: {e}") from None
        errors = [a for a in answers if isinstance(a, str)]
        if errors:
            self.close()
            raise ValueError(errors[0])
        return answers[0]

    def _run(self, command: tuple, time_limit_s: float | None) -> list:
        """Every rank's answer to `command`, on the group (started again if it was replaced); a
        group that fails is closed, and GroupFailed says how."""
        try:
            if not self.ranks:
                self._start()
            return self._ask(command, time_limit_s)
        except GroupFailed:
            self.close()
            raise

    def _ask(self, command: tuple, time_limit_s: float | None) -> list:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(command)
            except (OSError, ValueError):
                raise GroupFailed(self._died(rank)) from None
        slack = self.config.collective_timeout_s + GRACE_S
        deadline = time.monotonic() + time_limit_s + slack if time_limit_s is not None else None
        return self._collect(deadline, after_failure_s=slack, what="the trial")

    def _collect(self, deadline: float | None, *, after_failure_s: float, what: str) -> list:
        """Every rank's answer (its payload, or an error's text). A rank that dies, or does not
        answer by `deadline` (or within `after_failure_s` of another rank's failure), raises."""
        answers: dict[int, object] = {}
        while len(answers) < len(self.ranks):
            waiting = {r: c for r, c in enumerate(self.conns) if r not in answers}
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([*waiting.values(), *(self.ranks[r].sentinel for r in waiting)], timeout)
            if not ready:
                hung = sorted(waiting)
                raise GroupFailed(Measurement(
                    outcome=TrialOutcome.TIMEOUT, killed_worker=True,
                    message=f"rank(s) {hung} did not answer {what} in time (a hung collective?); group replaced"),
                    answers)
            for rank, conn in waiting.items():
                if conn in ready or self.ranks[rank].sentinel in ready:
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        raise GroupFailed(self._died(rank), answers) from None
                    answers[rank] = payload if kind in ("ok", "ready") else str(payload)
                    failed = isinstance(payload, Measurement) and not payload.ok or kind == "error"
                    if failed and (deadline is None or deadline > time.monotonic() + after_failure_s):
                        deadline = time.monotonic() + after_failure_s
        return [answers[r] for r in range(len(self.ranks))]

    def _died(self, rank: int) -> Measurement:
        p = self.ranks[rank]
        p.join(1.0)
        return Measurement(outcome=TrialOutcome.CRASHED, killed_worker=True,
                           message=f"rank {rank} died (exit code {p.exitcode}); group replaced")
