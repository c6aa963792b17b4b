"""CPU backend: one Python thread per stream (torch ops release the GIL, so threads overlap).

A stream's share is its thread's intra-op thread count: OpenMP and MKL keep one per thread, so
each stream thread runs its ops on a team of its share (a stream without one: all the device's
threads, `CPUBackend.threads`). Every run sets the count explicitly in every thread that runs
tasks, first thing, and sets the device's count back in the calling thread last: a count left by
an earlier run, or by another thread (torch's process-wide value is what a thread takes at its
first parallel op), never decides this one. What each thread saw is kept (`Runner.threads_seen`)
and goes into every measurement (runtime/steady.py).

Each multi-stream runner owns its stream threads and ends them when it is closed: a thread that
ran torch ops keeps an OpenMP team of its own, and while such teams live the sequential schedule
in the same process runs slower (seen on 2 cores: 1.1 -> 2.5 ms for llama-tiny after one
three-stream run, back to 1.3 ms once the threads ended). A measurement must not pay for the
threads a schedule measured before it left behind.
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..plan import Plan, Task
from .base import Backend, Runner


class CPUBackend(Backend):
    name = "cpu"

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an int >= 1 (the device's intra-op threads), but got {threads!r}.")
        self.threads = threads or torch.get_num_threads()  # the device's full count: the sequential run's

    def prepare(self, plan: Plan) -> Runner:
        notes = {"cuda_graph": "ignored on cpu"} if plan.schedule.cuda_graph else {}
        counts = [s.sm_share or self.threads for s in plan.schedule.streams]
        if plan.schedule.total_sm_share is not None:
            notes["partition"] = (f"cpu: each stream's thread runs its ops on its share of threads {counts} "
                                  f"(a stream without a share: all {self.threads})")
        seen = [0] * plan.num_streams
        if plan.num_streams == 1:
            def around(fn):  # any run of this plan (the case's own sequential call too): its count first
                return self._then_device_count(lambda: (set_threads(counts[0], seen), fn()))
            return Runner(run=around(lambda: _run_inline(plan)), notes=notes, around=around,
                          threads_seen=lambda: tuple(seen))
        pool = ThreadPoolExecutor(plan.num_streams, thread_name_prefix="dynaflow-stream")
        run = self._then_device_count(lambda: _run_threads(plan, pool, counts, seen))
        runner = Runner(run=run, notes=notes, close=lambda: pool.shutdown(wait=True), threads_seen=lambda: tuple(seen))
        weakref.finalize(runner, pool.shutdown, wait=False)  # a runner dropped unclosed ends its threads too
        return runner

    def _then_device_count(self, fn):
        """`fn`, then the device's thread count set back in this thread and as torch's process-wide
        value, whatever a stream thread set while it ran."""
        def run() -> None:
            try:
                fn()
            finally:
                torch.set_num_threads(self.threads)
        return run

    def synchronize(self) -> None:
        pass

    def peak_bytes(self, plan: Plan, runner: Runner) -> int | None:
        """Tasks run in issue order on this thread (dispatch modes are per thread): the values
        live exactly as long as in a threaded run, so the peak is the schedule's."""
        mode = LiveBytesMode()
        with mode:
            _run_inline(plan)
        return mode.peak


def set_threads(count: int, seen: list[int] | None = None, k: int = 0) -> None:
    """This thread's intra-op thread count, set explicitly (and what it reads back, into seen[k])."""
    torch.set_num_threads(count)
    if seen is not None:
        seen[k] = torch.get_num_threads()


@torch.no_grad()
def _run_inline(plan: Plan) -> None:
    plan.reset()
    for task in plan.tasks:
        task.fn()


def _run_threads(plan: Plan, pool: ThreadPoolExecutor, counts: list[int], seen: list[int]) -> None:
    plan.reset()
    done = [threading.Event() for _ in plan.tasks]
    failed = threading.Event()
    per_stream: list[list[int]] = [[] for _ in range(plan.num_streams)]
    for i, task in enumerate(plan.tasks):
        per_stream[task.stream].append(i)
    streams = [k for k, ids in enumerate(per_stream) if ids]
    # every stream thread sets its count before any of them runs a task: torch.set_num_threads
    # also resizes process-wide pools, which must not happen under another thread's running op
    ready = threading.Barrier(len(streams))
    futures = [pool.submit(_stream_worker, plan.tasks, per_stream[k], done, failed, counts[k], seen, k, ready)
               for k in streams]
    errors = []
    for f in futures:  # every stream ends before the run does; a task's exception is raised in the caller
        try:
            f.result()
        except BaseException as e:
            errors.append(e)
    if errors:  # the failure itself, not a stream released from the barrier by it
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])


@torch.no_grad()  # grad mode is per thread
def _stream_worker(tasks: list[Task], ids: list[int], done, failed, count: int, seen: list[int], k: int,
                   ready: threading.Barrier) -> None:
    passed = False
    try:
        set_threads(count, seen, k)
        ready.wait()
        passed = True
        for i in ids:
            for w in tasks[i].waits:
                done[w].wait()
            if failed.is_set():
                return
            tasks[i].fn()
            done[i].set()
    except BaseException:
        failed.set()
        if not passed:  # the other streams must not wait at the barrier for this one
            ready.abort()
        for ev in done:  # release every waiter so no stream hangs on a dead producer
            ev.set()
        raise


class LiveBytesMode(TorchDispatchMode):
    """Live bytes of the storages ops allocate (freed when their tensor dies), and their peak.
    Also the simulated device's allocator in tests/test_cuda_backend_sim.py."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes
