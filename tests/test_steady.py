"""Every timed run starts from a known state (runtime/steady.py), checked without timing anything:
after any candidate the sequential run sees the device's full thread count and no refaulting; a
stream thread's count stays in that thread; freed memory stays in a measuring process; a paired
round whose halves ran in different states is no evidence; on a GPU (the simulated device and
the fake driver) the sequential schedule runs on the current stream in the primary context."""
import dataclasses
import subprocess
import sys
import threading

import pytest
import torch

from dynaflow.runtime import Bench, Executor, MeasureConfig, Measurement, Schedule, StreamSpec, Workload, detect
from dynaflow.runtime import steady
from dynaflow.runtime.backends.cpu import CPUBackend
from dynaflow.runtime.schedule import Step
from dynaflow.tuner.confirm import compare, Entry
from dynaflow.tuner.paired import Comparison, Plan, Round
from fakes import FakeTarget, tiny_context

W = Workload(model="llama-tiny", num_decode=8, context_len=16)
FULL = 3  # the device's count in these tests: above every stream's share, whatever the machine's cores


@pytest.fixture(scope="module")
def bench():
    before = torch.get_num_threads()
    torch.set_num_threads(FULL)  # the backend takes the count it is built with as the device's
    try:
        # eight "cores", so that four streams of one thread each are a valid schedule on any machine
        yield Bench(W, config=MeasureConfig(warmup=1, repeats=3), hardware=dataclasses.replace(detect("cpu"), num_sms=8))
    finally:
        torch.set_num_threads(before)


def streams_schedule(graph, splits, shares) -> Schedule:
    """Nano-batch k on stream k, each stream with its share."""
    order = tuple(Step(op=op.name, nano=k, stream=k) for k in range(len(splits)) for op in graph.ops)
    return Schedule(split_sizes=tuple(splits), streams=tuple(StreamSpec(sm_share=s) for s in shares), order=order,
                    label=f"{len(splits)} streams {shares}")


def candidates(graph) -> list[Schedule]:
    return [streams_schedule(graph, (4, 4), (1, 1)),  # capped
            streams_schedule(graph, (4, 4), (None, None)),  # uncapped
            streams_schedule(graph, (3, 3, 2), (1, 2, None)),  # three streams, mixed
            streams_schedule(graph, (2, 2, 2, 2), (1, 1, 1, 1)),  # four streams
            Schedule(split_sizes=(4, 4), streams=(StreamSpec(sm_share=1),))]  # one capped stream


def seen_by_a_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_after_any_candidate_the_sequential_run_sees_the_full_count_and_the_same_state(bench):
    before = bench.measure(Schedule())
    assert before.ok and before.state.threads == (FULL,) and before.state.full_threads == FULL
    for schedule in candidates(bench.executor.graph):
        m = bench.measure(schedule)
        assert m.ok, (schedule.label, m.message)
        after = bench.measure(Schedule())
        assert after.state.threads == before.state.threads == (FULL,), schedule.label
        assert not after.state.refaulting and steady.sequential_off(after.state) is None, after.state
        assert torch.get_num_threads() == FULL and seen_by_a_new_thread() == FULL, schedule.label


def test_each_stream_thread_runs_with_its_own_share(bench):
    m = bench.measure(streams_schedule(bench.executor.graph, (3, 3, 2), (1, 2, None)))
    assert m.ok and m.state.threads == (1, 2, FULL)
    assert "[1, 2, 3]" in m.notes["partition"]


def test_a_failed_candidate_leaves_no_count_behind(bench):
    compiled = bench.executor.compile(streams_schedule(bench.executor.graph, (4, 4), (1, 1)))
    plan = compiled.plan
    k = next(i for i, t in enumerate(plan.tasks) if t.stream == 1)

    def boom():
        raise RuntimeError("injected in stream 1")
    plan.tasks[k] = dataclasses.replace(plan.tasks[k], fn=boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            compiled()
    finally:
        compiled.close()
    assert torch.get_num_threads() == FULL and seen_by_a_new_thread() == FULL
    assert bench.measure(Schedule()).state.threads == (FULL,)


def test_the_case_own_sequential_call_runs_in_the_known_state():
    """A case whose sequential run is its own call (serving's): the count is set around it too."""
    case, seen = W.build(), []
    case.sequential = lambda *inputs: (seen.append(torch.get_num_threads()), case.model(*inputs))[1]
    ex = Executor(case, backend=CPUBackend(threads=FULL))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what some earlier code left behind in this thread
    try:
        compiled = ex.compile(Schedule())
        compiled()
        assert seen == [FULL] and compiled.runner.threads_seen() == (FULL,)
        assert torch.get_num_threads() == FULL  # the device's count, set back after the run
    finally:
        torch.set_num_threads(before)


def test_the_backend_refuses_a_thread_count_below_one():
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        CPUBackend(threads=0)


# what a measuring process has imported (a Bench's modules) before it allocates: whether glibc's
# memalign leaves its trailing remainder where it blocks reuse depends on the heap's history (below)
ALLOCATE = """
import sys, torch
import dynaflow.runtime.measure
from dynaflow.runtime import steady
if sys.argv[1] == "keep":
    print(steady.keep_freed_memory(), file=sys.stderr)
faults = []
for _ in range(6):
    f0 = steady.page_faults()
    t = torch.empty(10 * 2**20).fill_(1.0)  # 40 MiB: above glibc's largest dynamic mmap threshold
    del t
    faults.append(steady.page_faults() - f0)
print(min(faults[2:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt and getrusage's fault counts are Linux's")
def test_freed_memory_stays_in_a_measuring_process_and_is_not_refaulted():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())
    assert faults("default") > 5000  # every allocation mmapped and faulted afresh: 10,240 pages
    assert faults("keep") < steady.FAULTING_PAGES


def test_a_bench_keeps_freed_memory(bench):
    assert bench.allocator == steady.keep_freed_memory()
    if sys.platform == "linux":
        assert bench.allocator.startswith("glibc: freed memory kept")


# --- the pair's states -----------------------------------------------------------------------

SEQ = steady.RunState(threads=(2,), full_threads=2, faults_per_run=0)
REFAULTING = steady.RunState(threads=(2,), full_threads=2, faults_per_run=16384)


@pytest.mark.parametrize("baseline, candidate, words", [
    (SEQ, steady.RunState(threads=(1, 1), full_threads=2), None),
    (REFAULTING, SEQ, "faulted 16,384 pages per run"),
    (steady.RunState(threads=(1,), full_threads=2), SEQ, "had [1] thread(s), not the device's 2"),
    (SEQ, dataclasses.replace(REFAULTING, threads=(1, 1)), "in one half only"),
    (None, SEQ, None),  # a state not read (an older record, a target that reads none): not held against it
])
def test_a_pair_differs_when_the_sequential_run_left_its_known_state(baseline, candidate, words):
    why = steady.differs(baseline, candidate)
    assert (why is None) if words is None else (words in why), why
    if baseline is not None:
        assert steady.RunState.from_dict(baseline.to_dict()) == baseline


def test_a_round_in_different_states_is_never_evidence():
    r = Round(baseline_ms=20.0, candidate_ms=10.0, unsteady="the sequential run faulted")
    quiet = Round(baseline_ms=10.0, candidate_ms=10.0)
    c = Comparison(rounds=(r, quiet))
    assert c.evidence() == (quiet,) and c.evidence(accept_contention=True) == (quiet,)
    assert c.unsteady_rounds == (r,) and c.busy_rounds == ()
    assert Round.from_dict(r.to_dict()) == r


class StatefulTarget(FakeTarget):
    """The sequential schedule twice as slow, and refaulting, in its slow mode (every other call)."""

    def measure(self, schedule, **kw) -> Measurement:
        m = super().measure(schedule, **kw)
        slow = schedule.is_sequential and self.calls % 2 == 0
        state = REFAULTING if slow else SEQ
        if slow:
            m = dataclasses.replace(m, samples_ms=tuple(2 * s for s in m.samples_ms))
        return dataclasses.replace(m, state=state)


def test_a_slow_mode_baseline_never_makes_a_winner():
    """Candidates equal to sequential: a baseline in its slow mode would make them look 2x faster;
    those rounds are no evidence, and nothing is stored as a winner."""
    target = StatefulTarget(tiny_context(), lambda s: 10.0)
    entries = [Entry(trial=1, schedule=Schedule(split_sizes=(16, 16)), speedup=2.0, pruned=False)]
    v = compare(target, entries, Plan(candidates=1, max_rounds=8))
    assert not v.wins
    c = v.candidates[0].comparison
    assert c.unsteady_rounds and all(r.ratio == pytest.approx(1.0, rel=0.02) for r in c.evidence())
    assert v.unsteady_rounds == len(c.unsteady_rounds)
    # with every round of it unsteady, the verdict says why
    target.measure = lambda schedule, **kw: dataclasses.replace(
        FakeTarget.measure(target, schedule, **kw), state=REFAULTING if schedule.is_sequential else SEQ)
    v = compare(target, entries, Plan(candidates=1, max_rounds=6))
    assert v.kind == "inconclusive" and "different states" in v.reason and "faulted" in v.reason


def test_a_stream_failing_before_its_first_task_ends_the_run_with_its_own_error(bench, monkeypatch):
    """The streams wait for each other's counts before any task (torch.set_num_threads resizes
    process-wide pools); one failing there releases the others, and the run raises its error."""
    from dynaflow.runtime.backends import cpu

    real = cpu.set_threads

    def failing(count, seen=None, k=0):
        if k == 1:
            raise RuntimeError("injected before the barrier")
        real(count, seen, k)
    monkeypatch.setattr(cpu, "set_threads", failing)
    compiled = bench.executor.compile(streams_schedule(bench.executor.graph, (4, 4), (1, 1)))
    try:
        with pytest.raises(RuntimeError, match="injected before the barrier"):
            compiled()
    finally:
        compiled.close()
    monkeypatch.undo()
    assert bench.measure(Schedule()).state.threads == (FULL,)
