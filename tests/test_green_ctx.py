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
    from dynaflow.runtime.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "_FOUND", {})  # the capture mode found is per process: not across tests
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


def test_granularity_follows_the_architecture_where_the_driver_does_not_say():
    assert green_ctx.sm_granularity("9.0") == 8 and green_ctx.sm_granularity("10.0") == 8
    assert green_ctx.sm_granularity("8.0") == 4
    assert green_ctx.sm_layout(0) == (None, None)  # no cuda-bindings here: the architecture's rule applies


def test_granularity_and_alignment_are_read_from_the_device_resource(device):
    """A device reporting a 16-SM minimum partition in 8-SM co-scheduled steps: partitions come in
    16s, an 8-SM share (legal by the architecture's rule) is invalid, and the hardware says so."""
    sim, fake = device
    fake.min_partition, fake.alignment = 12, 8  # rounded up to the alignment: 16
    assert green_ctx.sm_layout(0) == (16, fake.num_sms // 16)
    ex = _executor(sim)
    ref = ex.reference().clone()
    two = dict(split_sizes=(3, 6))
    with pytest.raises(ValueError, match="multiples of 16 SMs"):
        ex.compile(Schedule(**two, streams=(StreamSpec(sm_share=8), StreamSpec(sm_share=8))))
    run = ex.compile(Schedule(**two, streams=(StreamSpec(sm_share=32), StreamSpec(sm_share=16))))
    assert run.runner.notes["partition"] == "green contexts, granted SMs [32, 16] for requested [32, 16]"
    assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
    run.close()
    assert not fake.violations, fake.violations


def test_a_device_that_splits_into_fewer_groups_bounds_the_space_and_the_shares(device):
    """The driver may make fewer groups than SMs / step (cluster rules): the hardware records how
    many, the space never asks for more, and a share past them is invalid, not a crash."""
    from dynaflow.runtime import Hardware
    from dynaflow.search_spaces import SpaceContext, get_space
    import optuna

    sim, fake = device
    fake.max_groups = 10
    step, groups = green_ctx.sm_layout(0)
    assert groups == 10
    ex = _executor(sim)
    with pytest.raises(ValueError, match="splits into 10 groups"):
        ex.compile(Schedule(split_sizes=(3, 6), streams=(StreamSpec(sm_share=8 * step), StreamSpec(sm_share=3 * step))))
    hw = Hardware(kind="cuda", name="sim", arch=f"{fake.arch[0]}.{fake.arch[1]}", num_sms=fake.num_sms,
                  memory_bytes=80 * 2**30, sm_step=step, sm_groups=groups)
    ctx = SpaceContext(hardware=hw, graph=ex.graph, layout=ex.case.layout)
    space = get_space("nanoflow")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    asked = 0
    for _ in range(60):
        schedule = space(study.ask(), ctx)
        shares = [s.sm_share for s in schedule.streams if s.sm_share is not None]
        if shares:
            asked += 1
            assert sum(shares) <= groups * step and all(s % step == 0 for s in shares)
            ex.compile(schedule).close()  # every share set it proposes is grantable
    assert asked > 5
    assert not fake.violations


def _graph_schedule(ex, shares=(16, 16)):
    return Schedule(split_sizes=(3, 6), streams=tuple(StreamSpec(sm_share=s) for s in shares), cuda_graph=True,
                    order=tuple(Step(op=op, nano=b, stream=b) for op in ex.graph.names for b in (0, 1)))


@pytest.mark.parametrize("refused,chosen", [(set(), "green"), ({"green"}, "joined"), ({"joined"}, "green")])
def test_a_graph_over_green_streams_is_captured_the_way_the_driver_allows(device, refused, chosen):
    sim, fake = device
    sim.capture_refuses = refused
    ex = _executor(sim)
    ref = ex.reference().clone()
    run = ex.compile(_graph_schedule(ex))
    for _ in range(3):  # replays, between main-stream work
        assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
    assert ex.backend.capture_mode == chosen and sim.captures[-1] == chosen
    assert f"capture mode {chosen}" in run.runner.notes["cuda_graph"]
    if chosen != "green":  # green is tried first: where it failed, the notes say why
        assert "simulated" in run.runner.notes["cuda_graph"]  # the mode that failed, and why
    run.close()
    tried = len(sim.attempts)
    run = ex.compile(_graph_schedule(ex, (24, 8)))  # the next capture goes straight to the mode that worked
    assert sim.attempts[tried:] == [chosen]
    run.close()
    assert not fake.violations, fake.violations


def test_a_graph_no_capture_mode_allows_is_an_invalid_schedule(device):
    sim, fake = device
    sim.capture_refuses = {"green", "joined"}
    ex = _executor(sim)
    with pytest.raises(ValueError, match="cannot be captured on this stack .*green: .*joined: "):
        ex.compile(_graph_schedule(ex))
    run = ex.compile(dataclasses.replace(_graph_schedule(ex), streams=(StreamSpec(), StreamSpec())))
    run.close()  # a graph without SM shares still captures


def test_a_capture_that_does_not_join_its_streams_fails(device, monkeypatch):
    """Mutation check: drop the joins into the capture's origin and the (simulated) capture fails."""
    sim, fake = device
    ex = _executor(sim)
    monkeypatch.setattr(green_ctx.GreenMark, "block", lambda self, stream: None)
    monkeypatch.setattr(green_ctx.TorchMark, "block", lambda self, stream: None)
    with pytest.raises((ValueError, RuntimeError), match="unjoined|never joined"):
        ex.compile(_graph_schedule(ex))


def test_the_probe_tries_both_capture_modes_and_the_backend_uses_the_one_that_works(device):
    from dynaflow.runtime import probe
    from dynaflow.runtime.backends.cuda import CUDABackend

    sim, fake = device
    sim.capture_refuses = {"green"}
    ex = _executor(sim)
    ref = ex.reference().clone()
    schedule = _graph_schedule(ex)

    def run_with(mode):
        ex.backend = SimBackend(sim, capture_mode=mode)
        run = ex.compile(schedule)
        try:
            return run_between_main_stream_work(sim, run)
        finally:
            run.close()

    found = probe.capture_modes(run_with, lambda out: assert_equal_to_reference(out, ref, ex))
    assert found["joined"] is None and "simulated" in found["green"]
    assert probe.backend_choice(found) == "joined"
    ex.backend = SimBackend(sim)
    run = ex.compile(schedule)
    assert ex.backend.capture_mode == probe.backend_choice(found)
    run.close()
    assert isinstance(ex.backend, CUDABackend)


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


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_after_a_partitioned_candidate_the_sequential_schedule_runs_as_the_plain_model(device, graph):
    """On the current (default) stream, in the primary context, with every SM and the default
    priority: none of the candidate's green streams, priorities or graph pool is on its path."""
    sim, fake = device
    ex = _executor(sim)
    ref = ex.reference().clone()
    step = 8 if fake.arch >= (9, 0) else 4
    names = [op.name for op in ex.graph.ops]
    order = tuple(Step(op=n, nano=k, stream=k) for k in (0, 1) for n in names)
    half = ex.case.layout.num_requests // 2
    candidate = Schedule(split_sizes=(half, ex.case.layout.num_requests - half), order=order, cuda_graph=graph,
                         streams=(StreamSpec(sm_share=step, priority=-1), StreamSpec(sm_share=2 * step, priority=-2)))
    run = ex.compile(candidate)
    try:
        assert_equal_to_reference(run_between_main_stream_work(sim, run), ref, ex)
    finally:
        run.close()
    captures = list(sim.captures)
    sequential = ex.compile(Schedule())
    try:
        assert sequential.runner.streams == [sim.main] and sim.current is sim.main
        stream = sequential.runner.streams[0]
        assert stream.context is None and stream.priority == 0 and not fake.current  # primary context, every SM
        others = {id(s): len(s.queue) for s in sim.streams if s is not sim.main}
        sequential()
        assert all(len(s.queue) == others[id(s)] for s in sim.streams if s is not sim.main)  # nothing issued elsewhere
        assert sim.captures == captures  # and nothing captured or replayed
        sim.synchronize()
        assert_equal_to_reference(sequential.out, ref, ex)
    finally:
        sequential.close()
    assert not fake.violations, fake.violations
