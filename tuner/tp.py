"""Trials on a tensor-parallel group: one process per rank on this node, driven from the tuner.

    target = TPTarget(workload, config)   # starts workload.tp rank processes (gloo on CPU, NCCL on CUDA)
    target.measure(schedule)              # every rank measures it; rank 0's measurement reports

Each rank is a Station of tuner/remote.py's protocol: at the Prepare it builds its shard of the
workload and a Bench on it (runtime/measure.py); the driver sends every rank the same request,
so all run the same schedule in lockstep through their collectives (runtime/parallel.py). Rank
0's measurement is the trial's, unless another rank's failed: then the first failing rank's,
named. A rank that dies, or a group that does not answer within the collective timeout and a
grace after a failure (a hung collective), makes the trial CRASHED or TIMEOUT with
`killed_worker` set; the group is then replaced, as is one whose collectives failed (its ranks
may no longer be in step), before the next trial. Trials time fully: pruning needs the study,
which lives in the driver (as with Ray actors)."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from multiprocessing.connection import wait
from typing import Callable

from dynaflow.runtime import Measurement, MeasureConfig, TrialOutcome, Workload

from .measuring import LocalTarget, Target
from .records import TrialMeasurement
from .remote import Measure, Prepare, RemoteTarget, Reply, Request, Station, WorkerLost, died, hung

GRACE_S = 10.0  # after a failing rank's answer (or a trial's limit), before the others are declared hung
START_TIMEOUT_S = 900.0  # building the shards and their references
RESTARTS = {TrialOutcome.CRASHED, TrialOutcome.TIMEOUT, TrialOutcome.OOM}  # the ranks may be out of step after these


def rank_target(workload: Workload, config: MeasureConfig) -> LocalTarget:
    """What a rank measures on: its shard's Bench (`workload.device` is the rank's own)."""
    return LocalTarget(workload, config)


def _rank_main(rank: int, world: int, rendezvous: str, workload: Workload, config: MeasureConfig,
               build: Callable[[Workload, MeasureConfig], Target], conn) -> None:
    """A rank's process: join the group, then answer the driver's requests (tuner/remote.py)."""
    try:
        _serve_rank(rank, world, rendezvous, workload, config, build, conn)
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # Ctrl-C, or the driver is gone: leave quietly
        os._exit(1)


def _serve_rank(rank, world, rendezvous, workload, config, build, conn) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from dynaflow.runtime import parallel, telemetry
    from dynaflow.runtime.devices import device_type

    if rank > 0:
        warnings.simplefilter("ignore")  # rank 0 says it once
    else:
        from .errors import one_line

        warnings.formatwarning = one_line
    kind = device_type(workload.device)
    telemetry.count_as_own(conn.recv())  # the other ranks' pids: their work is not contention
    own = kind.indexed  # rank r on device r (cuda:r); else the ranks share the device
    if own:
        if kind.count() < world:
            conn.recv()
            conn.send(Reply(error=f"--tp {world} needs {world} {kind.label} devices (one per rank), but torch sees "
                                  f"{kind.count()}."))
            return
        getattr(torch, kind.name).set_device(rank)
    else:  # ranks share the machine's cores, as vLLM's CPU workers do
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    device = f"{kind.name}:{rank}" if own else workload.device
    dist.init_process_group(kind.collectives, init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=config.collective_timeout_s),
                            **({"device_id": torch.device(device)} if own else {}))
    parallel.current(timeout_s=config.collective_timeout_s)
    station = Station(lambda w, c: build(dataclasses.replace(w, device=device), c))
    while (request := conn.recv()) is not None:
        conn.send(station.handle(request))
    station.close()
    dist.destroy_process_group()


class TPTarget(RemoteTarget):
    """A workload at tensor parallelism `workload.tp`, measured on that many rank processes: the
    transport of tuner/remote.py over one pipe per rank, every request sent to every rank.
    `build(workload, config)` makes each rank's target there (a module-level function: it travels
    to the spawned ranks by name)."""

    def __init__(self, workload: Workload, config: MeasureConfig, *,
                 build: Callable[[Workload, MeasureConfig], Target] = rank_target) -> None:
        self.workload, self.config, self.build = workload, config, build
        self.ranks: list = []
        self.conns: list = []
        self.folder: str | None = None
        super().__init__(workload, config)

    # --- the transport ----------------------------------------------------------------------

    def connect(self) -> None:
        """Start the ranks (each joins the group; it builds its shard at the Prepare)."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch state
        self.folder = tempfile.mkdtemp(prefix="dynaflow-tp-")
        rendezvous = os.path.join(self.folder, "rendezvous")
        world = self.workload.tp
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(rank, world, rendezvous, self.workload, self.config, self.build,
                                                     theirs), name=f"dynaflow-tp-rank{rank}", daemon=True)
            p.start()
            theirs.close()
            self.ranks.append(p)
            self.conns.append(mine)
        for conn in self.conns:
            conn.send([p.pid for p in self.ranks])

    def send(self, request: Request, timeout_s: float | None) -> Reply:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(request)
            except (OSError, ValueError):
                raise self._died(rank) from None
        if isinstance(request, Prepare):
            try:
                replies = self._collect(time.monotonic() + START_TIMEOUT_S, after_failure_s=GRACE_S,
                                        what="building the shards")
            except WorkerLost as e:  # a rank that could not build its shard left the others waiting: its reason
                errors = [r.error for r in e.replies.values() if r.error is not None]
                if errors:
                    return Reply(error=errors[0])
                raise
            return next((r for r in replies if r.error is not None), replies[0])
        slack = self.config.collective_timeout_s + GRACE_S
        deadline = time.monotonic() + timeout_s + slack if timeout_s is not None else None
        replies = self._collect(deadline, after_failure_s=slack, what="the trial")
        if isinstance(request, Measure):
            return Reply(self._measurement(replies))
        return replies[0]

    def disconnect(self) -> None:
        """Stop the ranks (asked first, then killed), and remove the rendezvous folder."""
        for conn in self.conns:
            try:
                conn.send(None)
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
            self.disconnect()

    # --- the group --------------------------------------------------------------------------

    def _measurement(self, replies: list[Reply]) -> Measurement:
        """Rank 0's measurement, unless a rank's failed: then the first failing rank's, named. After
        a failure that may leave the ranks out of step the group is replaced (WorkerLost)."""
        answers = [r.measurement() for r in replies]
        failed = [(r, m) for r, m in enumerate(answers) if not m.ok]
        if not failed:
            return answers[0]
        rank, m = failed[0]
        m = dataclasses.replace(m, message=f"rank {rank}: {m.message}") if rank else m
        if any(a.outcome in RESTARTS for a in answers):  # its collectives failed: a fresh group for the next trial
            raise WorkerLost(TrialMeasurement.of(m, killed_worker=True))
        return m

    def _collect(self, deadline: float | None, *, after_failure_s: float, what: str) -> list[Reply]:
        """Every rank's reply. A rank that dies, or does not answer by `deadline` (or within
        `after_failure_s` of another rank's failure), raises WorkerLost."""
        replies: dict[int, Reply] = {}
        while len(replies) < len(self.ranks):
            waiting = {r: c for r, c in enumerate(self.conns) if r not in replies}
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([*waiting.values(), *(self.ranks[r].sentinel for r in waiting)], timeout)
            if not ready:
                raise hung(f"rank(s) {sorted(waiting)} did not answer {what} in time (a hung collective?); "
                           "group replaced", replies)
            for rank, conn in waiting.items():
                if conn in ready or self.ranks[rank].sentinel in ready:
                    try:
                        reply = conn.recv()
                    except (EOFError, OSError):
                        raise self._died(rank, replies) from None
                    replies[rank] = reply
                    failed = reply.error is not None or isinstance(reply.value, Measurement) and not reply.value.ok
                    if failed and (deadline is None or deadline > time.monotonic() + after_failure_s):
                        deadline = time.monotonic() + after_failure_s
        return [replies[r] for r in range(len(self.ranks))]

    def _died(self, rank: int, replies: dict[int, Reply] | None = None) -> WorkerLost:
        p = self.ranks[rank]
        p.join(1.0)
        return died(f"rank {rank} died (exit code {p.exitcode}); group replaced", replies)
