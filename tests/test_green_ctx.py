"""SM partitions against a fake driver that enforces the documented green-context rules, with
the real CUDA backend on the simulated device: partitions are made from one split, granted as
asked, each stream with its own priority; a share the device cannot grant is invalid; a stack
without green contexts says so and runs unpartitioned, never crashes."""
import dataclasses
import random

import pytest
import torch

from dynaflow.runtime import Executor, Schedule, StreamSpec, Workload
from dynaflow.runtime.schedule import Step
from dynaflow.runtime.timeline import record_timeline
from dynaflow.runtime.backends import green_ctx
from fake_driver import FakeDriver
from schedules import random_schedule
from test_cuda_backend_sim import SimBackend, SimDevice, SimStream, run_between_main_stream_work
from test_equivalence import CASES, assert_equal_to_reference


@pytest.fixture(params=[(9, 0), (8, 0)], ids=["sm90", "sm80"])
def device(request, monkeypatch):
    sim = SimDevice(seed=0)
    fake = FakeDriver(num_sms=132 if request.param >= (9, 0) else 108, arch=request.param, sim=sim)
    sim.install(monkeypatch)
    fake.install(monkeypatch)

    def from_external(raw, device=None):
        context, priority = fake.streams[raw]
        stream = SimStream(sim, priority=priority, context=context)
        stream.raw, stream.cuda_stream = raw, raw
        return stream

    monkeypatch.setattr(torch.cuda, "get_stream_from_external", from_external)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: request.param)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    return sim, fake


def _executor(sim) -> Executor:
    return Executor(Workload(**CASES["llama-tiny"]).build(), backend=SimBackend(sim))


def test_random_partitioned_schedules_get_what_they_asked_and_equal_sequential(device):
    sim, fake = device
    ex = _executor(sim)
    ref = ex.reference().clone()
    step = 8 if fake.arch >= (9, 0) else 4
    rng = random.Random(0)
    for i in range(25):
        base = random_schedule(ex.graph, ex.case.layout, rng)
        specs = tuple(StreamSpec(sm_share=None if rng.random() < 0.25 else step * rng.randint(1, 4),
                                 priority=rng.choice([0, -1, -2])) for _ in base.streams)
        schedule = dataclasses.replace(base, streams=specs)
        run = ex.compile(schedule)
        try:
            assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
            want = [s.sm_share for s in specs if s.sm_share is not None]
            if want:
                assert not fake.violations, fake.violations
                assert run.runner.notes["partition"] == f"green contexts, granted SMs {want} for requested {want}"
                streams = ex.backend._sets._sets[(tuple(s.sm_share for s in specs),
                                                  tuple(s.priority for s in specs))].streams
                for spec, stream in zip(specs, streams):  # each stream carries its own spec's priority
                    assert stream.priority == spec.priority
                    assert (getattr(stream, "raw", None) is not None) == (spec.sm_share is not None)
        finally:
            run.close()
    assert not fake.violations, fake.violations


def test_the_fake_driver_refuses_a_split_of_a_remainder(device):
    """Mutation check: the old way (split what the previous split left) breaks a documented rule."""
    _, fake = device
    driver = __import__("cuda.bindings.driver", fromlist=["driver"])
    whole = driver.cuDeviceGetDevResource(0, 1)[1]
    _, groups, _, rest = driver.cuDevSmResourceSplitByCount(1, whole, 0, 8)
    assert driver.cuDevSmResourceSplitByCount(1, rest, 0, 8)[0] != 0
    other = driver.cuDevSmResourceSplitByCount(2, whole, 0, 8)[1]
    assert driver.cuDevResourceGenerateDesc([groups[0], other[0]], 2)[0] != 0  # groups of two splits
    assert fake.violations == ["split of a split's remainder", "descriptor groups from different split calls"]


def test_shares_the_device_cannot_grant_make_the_schedule_invalid(device):
    sim, fake = device
    ex = _executor(sim)
    step = 8 if fake.arch >= (9, 0) else 4
    two = dict(split_sizes=(3, 6))
    with pytest.raises(ValueError, match=f"multiples of {step} SMs"):
        ex.compile(Schedule(**two, streams=(StreamSpec(sm_share=step + 2), StreamSpec(sm_share=step))))
    with pytest.raises(ValueError, match=r"splits into \d+ groups"):
        ex.compile(Schedule(**two, streams=(StreamSpec(sm_share=step * (fake.num_sms // step - 1)),
                                             StreamSpec(sm_share=2 * step))))
    assert not fake.contexts and not fake.streams  # nothing made is kept


def test_a_binding_without_green_contexts_is_unavailable_not_a_crash(device, monkeypatch):
    sim, fake = device
    driver = __import__("cuda.bindings.driver", fromlist=["driver"])
    monkeypatch.delattr(driver, "cuGreenCtxStreamCreate")  # an older cuda-bindings
    ex = _executor(sim)
    ref = ex.reference().clone()
    run = ex.compile(Schedule(split_sizes=(3, 6), streams=(StreamSpec(sm_share=16), StreamSpec(sm_share=16))))
    assert run.runner.notes["partition"].startswith("unavailable: AttributeError")
    assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
    run.close()
    assert not fake.contexts  # the green context made before the failure was destroyed


def test_granularity_follows_the_architecture():
    assert green_ctx.sm_granularity("9.0") == 8 and green_ctx.sm_granularity("10.0") == 8
    assert green_ctx.sm_granularity("8.0") == 4


def test_a_torch_event_recorded_on_a_green_stream_is_refused(device, monkeypatch):
    """Mutation check: events made in the primary context (torch's, as `wait_stream` and
    `torch.cuda.Event` make them) recorded on a green stream break the driver's rule and fail."""
    sim, fake = device
    ex = _executor(sim)
    monkeypatch.setattr(green_ctx.StreamSet, "mark", lambda self, stream, timing=False: green_ctx.TorchMark(timing))
    run = ex.compile(Schedule(split_sizes=(3, 6), streams=(StreamSpec(sm_share=16), StreamSpec(sm_share=16))))
    with pytest.raises(RuntimeError, match="invalid resource handle"):
        run_between_main_stream_work(sim, run)
    run.close()


def test_events_live_in_their_streams_contexts_and_die_before_them(device):
    sim, fake = device
    ex = _executor(sim)
    ref = ex.reference().clone()
    schedule = Schedule(split_sizes=(3, 6), streams=(StreamSpec(sm_share=16), StreamSpec()),
                        order=tuple(Step(op=op, nano=b, stream=b) for op in ex.graph.names for b in (0, 1)))
    run = ex.compile(schedule)
    assert fake.events and {c for c, _ in fake.events.values()} == set(fake.contexts)  # one green context's events
    assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
    timeline = record_timeline(run, runs=2)  # timed with events of each stream's own context
    assert {(s.op, s.nano, s.stream) for s in timeline.spans} == {(s.op, s.nano, s.stream) for s in schedule.order}
    assert all(s.end_ms > s.start_ms >= 0 for s in timeline.spans)
    run.close()
    assert not fake.events and not fake.violations
    ex.backend._sets.capacity = 0
    ex.backend._sets._make_room()  # destroys the idle set: its green context goes after its events
    assert not fake.contexts and not fake.violations
