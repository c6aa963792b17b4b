"""CPU backend: one Python thread per stream (torch ops release the GIL, so threads overlap).

Thread shares cannot be enforced per stream: torch's intra-op pool is process-global. The sum
of the shares caps the pool while the plan runs, and the runner's notes say so.

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

    def prepare(self, plan: Plan) -> Runner:
        notes = {"cuda_graph": "ignored on cpu"} if plan.schedule.cuda_graph else {}
        threads = plan.schedule.total_sm_share
        if threads is not None:
            notes["partition"] = (f"cpu: thread shares cap torch's process-global intra-op pool at "
                                  f"{threads} thread(s) in all; per-stream shares are not enforceable")
        if plan.num_streams == 1:
            return Runner(run=_with_threads(threads, lambda: _run_inline(plan)), notes=notes)
        pool = ThreadPoolExecutor(plan.num_streams, thread_name_prefix="dynaflow-stream")
        runner = Runner(run=_with_threads(threads, lambda: _run_threads(plan, pool)), notes=notes,
                        close=lambda: pool.shutdown(wait=True))
        weakref.finalize(runner, pool.shutdown, wait=False)  # a runner dropped unclosed ends its threads too
        return runner

    def synchronize(self) -> None:
        pass

    def peak_bytes(self, plan: Plan, runner: Runner) -> int | None:
        """Tasks run in issue order on this thread (dispatch modes are per thread): the values
        live exactly as long as in a threaded run, so the peak is the schedule's."""
        mode = LiveBytesMode()
        with mode:
            _run_inline(plan)
        return mode.peak


@torch.no_grad()
def _run_inline(plan: Plan) -> None:
    plan.reset()
    for task in plan.tasks:
        task.fn()


def _run_threads(plan: Plan, pool: ThreadPoolExecutor) -> None:
    plan.reset()
    done = [threading.Event() for _ in plan.tasks]
    failed = threading.Event()
    per_stream: list[list[int]] = [[] for _ in range(plan.num_streams)]
    for i, task in enumerate(plan.tasks):
        per_stream[task.stream].append(i)
    futures = [pool.submit(_stream_worker, plan.tasks, ids, done, failed) for ids in per_stream if ids]
    for f in futures:
        f.result()  # re-raises a task's exception in the caller


@torch.no_grad()  # grad mode is per thread
def _stream_worker(tasks: list[Task], ids: list[int], done, failed) -> None:
    try:
        for i in ids:
            for w in tasks[i].waits:
                done[w].wait()
            if failed.is_set():
                return
            tasks[i].fn()
            done[i].set()
    except BaseException:
        failed.set()
        for ev in done:  # release every waiter so no stream hangs on a dead producer
            ev.set()
        raise


def _with_threads(threads: int | None, fn):
    if threads is None:
        return fn

    def run() -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fn()
        finally:
            torch.set_num_threads(before)

    return run


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
