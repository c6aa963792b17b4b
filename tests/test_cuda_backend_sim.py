"""The CUDA backend's stream and event logic, run on the CPU against a simulated device.

The simulated device keeps one queue per stream and executes only when synchronised, in a
random interleaving that respects nothing but what CUDA guarantees: order within a stream,
`wait_event` on a recorded event, and `wait_stream`. A missing wait therefore shows up as a
wrong output (or a read of a value not yet made), as it would on a GPU on a bad day.

CUDA graphs are simulated by CUDA's capture rules: work issued during a capture is recorded,
not run; a stream takes part only by waiting on an event recorded in the capture, and must be
joined back into the stream the capture began on before it ends (else the capture fails,
cudaErrorStreamCaptureUnjoined); a replay issues the recorded work after the replaying stream's
earlier work. `capture_refuses` names the capture modes a driver might refuse ("green": a
capture begun on a green-context stream; "joined": green streams joining a capture begun on a
primary-context stream), since which one the real driver allows is not documented.
"""
import dataclasses
import random
from contextlib import contextmanager

import pytest
import torch

from dynaflow.runtime import Executor, Schedule, StreamSpec, Workload

from dynaflow.runtime.backends.base import Runner
from dynaflow.runtime.backends.cpu import LiveBytesMode
from dynaflow.runtime.backends.cuda import CUDABackend, graph_pool_bytes
from dynaflow.runtime.schedule import Step
from schedules import random_schedule
from test_equivalence import CASES, assert_equal_to_reference


class SimEvent:
    """`context`: the context it was made in (None: the primary context, torch's events)."""

    def __init__(self, sim: "SimDevice", context=None) -> None:
        self.sim, self.done, self.context = sim, True, context

    def record(self, stream=None) -> None:
        stream = stream or self.sim.current
        if stream.context != self.context:  # the driver's rule: record only on a stream of the event's context
            raise RuntimeError(f"CUDA error: invalid resource handle (event of context {self.context} recorded "
                               f"on a stream of context {stream.context})")
        self.done = False
        stream.queue.append(("record", self))

    def elapsed_time(self, end: "SimEvent") -> float:
        """Simulated milliseconds: one per task the device ran between the two records."""
        return float(end.at - self.at)


class SimStream:
    """`context`: None for torch's streams (primary context), a green context's handle for its streams."""

    def __init__(self, sim: "SimDevice", priority: int = 0, context=None) -> None:
        self.sim, self.priority, self.queue, self.context = sim, priority, [], context
        self.cuda_stream = 1 + len(sim.streams)
        sim.streams.append(self)

    def wait_event(self, event: SimEvent) -> None:
        self.queue.append(("wait", event))

    def wait_stream(self, other: "SimStream") -> None:
        event = SimEvent(self.sim)
        event.record(other)
        self.wait_event(event)


class SimMemory(LiveBytesMode):
    """The caching allocator's counters, simulated: bytes of the tensors the device's work made,
    live until their tensor dies (the CPU backend's own counter), and the peak since the last reset."""

    def reset_peak(self, device=None) -> None:
        self.peak = self.live


class SimGraph:
    def __init__(self, sim: "SimDevice") -> None:
        self.sim, self.items = sim, []  # (stream, its recorded work)

    def pool(self):
        return (7, 7)

    def replay(self) -> None:
        """The recorded work, after the current stream's earlier work; the current stream's later
        work after all of it (a graph launch is one operation on the stream)."""
        here = self.sim.current
        start = SimEvent(self.sim, context=here.context)
        start.record(here)
        for stream, items in self.items:
            stream.wait_event(start)
            for kind, item in items:
                if kind == "record":
                    item.done = False  # recorded again by this replay
                stream.queue.append((kind, item))
            end = SimEvent(self.sim, context=stream.context)
            end.record(stream)
            here.wait_event(end)


class SimDevice:
    def __init__(self, seed: int) -> None:
        self.rng, self.streams, self.tasks_run = random.Random(seed), [], 0
        self.main = SimStream(self)
        self.current = self.main
        self.memory = SimMemory()
        self.capture_refuses: set[str] = set()
        self.captures: list[str] = []  # how each capture that succeeded began: "green" or "joined"
        self.attempts: list[str] = []  # how each capture tried began

    @contextmanager
    def graph(self, graph: SimGraph, stream=None, **kwargs):
        origin = stream if stream is not None else SimStream(self)  # torch captures on a side stream of its own
        mode = "green" if origin.context is not None else "joined"
        self.attempts.append(mode)
        if mode == "green" and "green" in self.capture_refuses:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (simulated: a capture "
                               "begun on a green-context stream)")
        self.synchronize()
        before = {id(st): len(st.queue) for st in self.streams}
        with self.on(origin):
            yield
        recorded = []
        for st in self.streams:
            at = before.get(id(st), 0)
            if len(st.queue) > at:
                recorded.append((st, st.queue[at:]))
                del st.queue[at:]
        self._check_capture(origin, mode, recorded)
        graph.items = recorded
        self.captures.append(mode)

    def _check_capture(self, origin, mode: str, recorded) -> None:
        origin_waits = {id(item) for st, items in recorded if st is origin for kind, item in items if kind == "wait"}
        captured = {id(item) for _, items in recorded for kind, item in items if kind == "record"}
        for st, items in recorded:
            if st is origin:
                continue
            if items[0][0] != "wait" or id(items[0][1]) not in captured:
                raise RuntimeError("work issued during a capture on a stream that never joined it")
            if mode == "joined" and st.context is not None and "joined" in self.capture_refuses:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing (simulated: a "
                                   "green-context stream joining a capture begun on a primary-context stream)")
            if items[-1][0] != "record" or id(items[-1][1]) not in origin_waits:
                raise RuntimeError("CUDA error: capture unjoined (cudaErrorStreamCaptureUnjoined): a stream's "
                                   "work was not joined back into the capture's origin stream")

    def stream(self, device=None, priority: int = 0) -> SimStream:
        return SimStream(self, priority)

    def by_handle(self, handle: int) -> SimStream:
        return next(s for s in self.streams if s.cuda_stream == handle)

    @contextmanager
    def on(self, stream: SimStream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def synchronize(self, device=None) -> None:
        while any(s.queue for s in self.streams):
            ready = [s for s in self.streams if s.queue and (s.queue[0][0] != "wait" or s.queue[0][1].done)]
            assert ready, "deadlock: every stream waits on an event nobody will record"
            kind, item = self.rng.choice(ready).queue.pop(0)
            if kind == "record":
                item.done, item.at = True, self.tasks_run
            elif kind == "task":
                with self.memory:
                    item()
                self.tasks_run += 1

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "Stream", self.stream)
        monkeypatch.setattr(cuda, "Event", lambda *a, **k: SimEvent(self))
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(cuda, "CUDAGraph", lambda *a, **k: SimGraph(self))
        monkeypatch.setattr(cuda, "graph", self.graph)
        monkeypatch.setattr(cuda, "memory_snapshot", lambda: [])
        monkeypatch.setattr(cuda, "stream", self.on)
        monkeypatch.setattr(cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.memory.live)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.memory.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", self.memory.reset_peak)


class SimBackend(CUDABackend):
    """The real CUDA backend; only each task's work is queued on the stream it is issued to."""

    def __init__(self, sim: SimDevice, capture_mode: str | None = None) -> None:
        super().__init__("cuda:0", capture_mode=capture_mode)
        self.sim = sim

    def prepare(self, plan):
        plan.tasks = [dataclasses.replace(t, fn=self._deferred(t.fn)) for t in plan.tasks]
        return super().prepare(plan)

    def _deferred(self, fn):
        def issue() -> None:  # the work runs later, under the grad mode it was issued in
            grad = torch.is_grad_enabled()

            def work() -> None:
                with torch.set_grad_enabled(grad):
                    fn()

            self.sim.current.queue.append(("task", work))

        return issue


def run_between_main_stream_work(sim: SimDevice, run) -> torch.Tensor:
    """Main-stream work before the run (clearing the output) and after it (reading the output):
    only the run's fork from and join into the main stream order them."""
    seen = {}
    sim.main.queue.append(("task", run.out.zero_))
    run()
    sim.main.queue.append(("task", lambda: seen.update(out=run.out.clone())))
    sim.synchronize()
    return seen["out"]


@pytest.fixture
def sim(monkeypatch):
    device = SimDevice(seed=0)
    device.install(monkeypatch)
    return device


@pytest.mark.parametrize("name", ["llama-tiny", "mixtral-tiny", "user-gated-block"])
def test_random_schedules_on_the_simulated_device_equal_sequential(name, sim):
    ex = Executor(Workload(**CASES[name]).build(), backend=SimBackend(sim))
    ref = ex.reference().clone()
    rng = random.Random(name)
    multi_stream = 0
    for i in range(30):
        schedule = random_schedule(ex.graph, ex.case.layout, rng)
        run = ex.compile(schedule)
        try:
            for seed in range(3):  # three interleavings of the same issue
                sim.rng.seed(f"{name}-{i}-{seed}")
                assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
        finally:
            run.close()
        multi_stream += len(schedule.streams) > 1 and schedule.num_nano > 1
    assert multi_stream >= 10 and sim.tasks_run > 0


def test_the_simulator_catches_a_missing_cross_stream_wait(sim, monkeypatch):
    """Mutation check: drop the waits and some interleaving must go wrong."""
    ex = Executor(Workload(**CASES["llama-tiny"]).build(), backend=SimBackend(sim))
    ref = ex.reference().clone()
    monkeypatch.setattr(SimStream, "wait_event", lambda self, event: None)
    schedule = Schedule(split_sizes=(4, 5), streams=(StreamSpec(), StreamSpec()),
                        order=tuple(Step(op=op, nano=b, stream=i % 2)
                                    for i, op in enumerate(ex.graph.names) for b in (0, 1)))
    run = ex.compile(schedule)
    failures = 0
    for seed in range(20):
        sim.rng.seed(seed)
        try:
            assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
        except (AssertionError, KeyError, RuntimeError):
            failures += 1
            for s in sim.streams:
                s.queue.clear()
    assert failures > 0


def test_sm_shares_without_cuda_bindings_run_unpartitioned_and_say_why(sim):
    ex = Executor(Workload(**CASES["llama-tiny"]).build(), backend=SimBackend(sim))
    ref = ex.reference().clone()
    run = ex.compile(Schedule(split_sizes=(3, 6), streams=(StreamSpec(sm_share=64), StreamSpec(sm_share=32))))
    assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
    assert run.runner.notes["partition"].startswith("unavailable: ")
    run.close()
    assert all(e.users == 0 for e in ex.backend._sets._sets.values())


def test_peak_memory_is_measured_from_a_quiesced_start(sim):
    """The values a run leaves in the plan are freed before the start is read: a schedule measured
    after earlier runs has the peak of its first run (counting them in the start hid the peak)."""
    ex = Executor(Workload(**CASES["llama-tiny"]).build(), backend=SimBackend(sim))
    ex.reference()
    schedule = Schedule(split_sizes=(4, 5), streams=(StreamSpec(), StreamSpec()),  # values cross streams:
                        order=tuple(Step(op=op, nano=b, stream=i % 2)           # held until the next run
                                    for i, op in enumerate(ex.graph.names) for b in (0, 1)))
    fresh = ex.compile(schedule)
    first = ex.backend.peak_bytes(fresh.plan, fresh.runner)
    fresh.close()
    run = ex.compile(schedule)
    for _ in range(2):
        run_between_main_stream_work(sim, run)  # leaves the run's values in the plan
    assert first > 0
    assert [ex.backend.peak_bytes(run.plan, run.runner) for _ in range(2)] == [first, first]
    run.close()


def test_a_cuda_graph_reports_its_pool_never_zero(monkeypatch):
    pool = (3, 1)
    snapshot = [{"device": 0, "segment_pool_id": pool, "total_size": 2 << 20},
                {"device": 0, "segment_pool_id": pool, "total_size": 4 << 20},
                {"device": 0, "segment_pool_id": (0, 0), "total_size": 64 << 20},  # the default pool
                {"device": 1, "segment_pool_id": pool, "total_size": 8 << 20}]  # another device
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    assert graph_pool_bytes(pool, 0) == 6 << 20
    assert graph_pool_bytes((9, 9), 0) is None  # unknown, not 0: nothing can divide by it

    class GraphPlan:
        schedule = Schedule(cuda_graph=True)

        def reset(self):
            raise AssertionError("a captured graph is not run again to size its memory")

    backend = CUDABackend.__new__(CUDABackend)
    assert backend.peak_bytes(GraphPlan(), Runner(run=lambda: None, peak_bytes=6 << 20)) == 6 << 20
