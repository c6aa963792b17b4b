"""The performance model: the simulator on schedules whose time is known by construction, the
profile's fits and file, and a profile measured on a paced model whose true times are known."""
import json
import math

import pytest

from dynaflow.runtime import BatchLayout, Schedule, Step, StreamSpec
from dynaflow.runtime.graph import Op, OpGraph
from dynaflow.runtime.perfmodel import Profile, Simulator, measure_profile, model_error, spearman
from dynaflow.runtime.perfmodel.profile import _fit
from dynaflow.runtime.perfmodel.profiler import load_or_measure

ROWS = 8
LAYOUT = BatchLayout(request_tokens=(1,) * ROWS, request_kinds=("decode",) * ROWS, input_axes=("requests",),
                     output_axis="requests")


def graph(*ops: tuple[str, str, tuple[str, ...]]) -> OpGraph:
    return OpGraph(ops=tuple(Op(name=n, deps=d, resource=r) for n, r, d in ops), module=None, writes_output=False)


def profile(ms: dict[str, float], *, beta=None, dispatch=0.0, wake=0.0, overhead=None, issue="per-stream",
            resources=None, total=8, shares=None) -> Profile:
    """Each op's time proportional to its rows: ms[op] on the whole batch (no cost to splitting)."""
    resources = resources or {}
    fits = {op: {str(s): [0.0, t / ROWS * total / s] for s in (shares or (total,))} for op, t in ms.items()}
    return Profile(hardware="test", workload="test", issue=issue, total_share=total, shares=tuple(shares or (total,)),
                   kinds=("decode",), ops={op: {"resource": resources.get(op, "compute"), "fits": fits[op]} for op in ms},
                   dispatch_ms=dispatch, wake_ms=wake, overhead_ms=overhead or {}, whole={"decode": ROWS},
                   interference={"shared": beta or {}})


CHAIN = graph(("a", "compute", ()), ("b", "memory", ("a",)), ("c", "compute", ("b",)))
CHAIN_MS = {"a": 1.0, "b": 2.0, "c": 3.0}
RES = {"a": "compute", "b": "memory", "c": "compute"}


def per_nano(g: OpGraph, num_nano: int = 2, stagger: int = 0, shares=None) -> Schedule:
    from dynaflow.runtime.plan import staggered_order

    sizes = tuple([ROWS // num_nano] * num_nano)
    return Schedule(split_sizes=sizes, streams=tuple(StreamSpec(sm_share=s) for s in (shares or [None] * num_nano)),
                    order=staggered_order(g, num_nano, stagger, lambda op, b: b), label="per-nano")


def test_the_sequential_schedule_is_the_sum_of_its_ops_plus_dispatch_and_the_run_cost():
    sim = Simulator(profile(CHAIN_MS, dispatch=0.1, overhead={"1": 0.5}, resources=RES), CHAIN, LAYOUT)
    p = sim.predict(Schedule())
    assert p.ms == pytest.approx(6.0 + 3 * 0.1 + 0.5)
    assert p.busy_ms == pytest.approx({"compute": 4.0, "memory": 2.0})


def test_two_nano_batches_on_one_stream_cost_what_the_whole_does_when_splitting_is_free():
    sim = Simulator(profile(CHAIN_MS, resources=RES), CHAIN, LAYOUT)
    assert sim.predict(Schedule(split_sizes=(4, 4))).ms == pytest.approx(6.0)


def test_without_interference_two_streams_overlap_perfectly():
    """Nano-batch 0 on stream 0, nano-batch 1 on stream 1, op by op: each stream runs 3 ms of
    work (half of each op) at the same time: 3 ms, not 6."""
    sim = Simulator(profile(CHAIN_MS, resources=RES), CHAIN, LAYOUT)
    assert sim.predict(per_nano(CHAIN)).ms == pytest.approx(3.0)


def test_two_equal_tasks_that_serialise_on_one_unit_take_as_long_as_one_after_the_other():
    """beta 0.5: beside the other, each runs at half speed, so both end at 2t (serially: t, then 2t)."""
    g = graph(("a", "compute", ()))
    sim = Simulator(profile({"a": 2.0}, beta={"compute": {"compute": 0.5}}), g, LAYOUT)
    assert sim.predict(per_nano(g)).ms == pytest.approx(2.0)


def test_interference_of_unequal_tasks_follows_the_fluid_model():
    """Stream 0 runs a (2 ms), stream 1 runs m (1 ms); beside each other both lose half their speed:
    m ends at 2 (1 ms of work at half speed), then a's remaining 1 ms runs alone: 3 ms."""
    g = graph(("a", "compute", ()), ("m", "memory", ()))
    prof = profile({"a": 2.0, "m": 1.0}, beta={"compute": {"memory": 0.5}, "memory": {"compute": 0.5}},
                   resources={"m": "memory"})
    s = Schedule(streams=(StreamSpec(), StreamSpec()), order=(Step(op="a", nano=0, stream=0), Step(op="m", nano=0, stream=1)))
    assert Simulator(prof, g, LAYOUT).predict(s).makespan_ms == pytest.approx(3.0)


def test_beside_several_the_slowdowns_add_as_equal_shares_of_one_unit():
    """Three equal tasks on three streams, each losing half its speed beside one other: k equal
    shares of one unit run at 1/k each, so all three end at 3t."""
    g = graph(("a", "compute", ()))
    prof = profile({"a": 3.0}, beta={"compute": {"compute": 0.5}})
    layout = BatchLayout(request_tokens=(1,) * 9, request_kinds=("decode",) * 9, input_axes=("requests",),
                         output_axis="requests")
    prof = Profile(**{**prof.to_dict(), "shares": prof.shares, "kinds": prof.kinds,
                      "ops": {"a": {"resource": "compute", "fits": {"8": [0.0, 3.0 / 9]}}}})
    s = Schedule(split_sizes=(3, 3, 3), streams=(StreamSpec(),) * 3,
                 order=tuple(Step(op="a", nano=b, stream=b) for b in range(3)))
    assert Simulator(prof, g, layout).predict(s).makespan_ms == pytest.approx(3.0)


def test_a_task_reading_from_another_stream_waits_for_it_and_for_the_wake_up():
    """compute on stream 0, memory on stream 1, one nano-batch: a chain crossing streams twice."""
    sim = Simulator(profile(CHAIN_MS, wake=0.25, resources=RES), CHAIN, LAYOUT)
    s = Schedule(streams=(StreamSpec(), StreamSpec()), order=(Step(op="a", nano=0, stream=0),
                                                              Step(op="b", nano=0, stream=1),
                                                              Step(op="c", nano=0, stream=0)))
    assert sim.predict(s).ms == pytest.approx(6.0 + 2 * 0.25)


def test_one_issuer_pays_every_launch_in_order_and_a_graph_pays_none():
    """On a GPU one host thread issues each task (0.5 ms each here): three 0.1 ms ops are bound by
    their launches; replayed as a CUDA graph, by the ops."""
    prof = profile({"a": 0.1, "b": 0.1, "c": 0.1}, dispatch=0.5, issue="one-issuer", resources=RES)
    sim = Simulator(prof, CHAIN, LAYOUT)
    assert sim.predict(Schedule(order=tuple(Step(op=o, nano=0) for o in "abc"))).makespan_ms == pytest.approx(1.6)
    graphed = Schedule(order=tuple(Step(op=o, nano=0) for o in "abc"), cuda_graph=True)
    assert sim.predict(graphed).makespan_ms == pytest.approx(0.3)


def test_the_headroom_bound_is_the_sum_over_the_busiest_class():
    h = Simulator(profile(CHAIN_MS, resources=RES), CHAIN, LAYOUT).headroom()
    assert h.busiest == "compute" and h.bound_speedup == pytest.approx(6.0 / 4.0)
    assert "1.50x" in h.text()


def test_a_share_scales_an_op_between_the_shares_profiled():
    """Fits at shares 2 and 8: a stream of share 4 is interpolated in 1/share, one of 1 scaled."""
    prof = profile({"a": 1.0}, shares=(2, 8))
    whole = {"decode": ROWS}
    assert prof.solo_ms("a", whole, None) == pytest.approx(1.0)
    assert prof.solo_ms("a", whole, 2) == pytest.approx(4.0)
    assert prof.solo_ms("a", whole, 4) == pytest.approx(4.0 + (1 / 4 - 1 / 2) / (1 / 8 - 1 / 2) * (1.0 - 4.0))
    assert prof.solo_ms("a", whole, 1) == pytest.approx(8.0)


def test_the_fit_recovers_a_line_per_kind_and_never_a_negative_cost():
    points = [({"decode": d, "prefill": p}, 0.5 + 0.1 * d + 0.01 * p) for d, p in [(16, 64), (8, 0), (8, 64), (4, 0)]]
    assert _fit(points, ("decode", "prefill")) == pytest.approx([0.5, 0.1, 0.01])
    falling = [({"decode": d}, 2.0 - 0.1 * d) for d in (2, 4, 8)]  # noise that makes more rows cheaper
    coef = _fit(falling, ("decode",))
    assert coef[1] == 0.0 and coef[0] == pytest.approx(sum(ms for _, ms in falling) / 3)


def test_a_profile_round_trips_through_its_file_and_a_wrong_one_is_named(tmp_path):
    prof = profile(CHAIN_MS, beta={"compute": {"memory": 0.1}}, resources=RES)
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again == prof
    with pytest.raises(ValueError, match="version-1 profile"):
        Profile.from_dict({**prof.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="missing or unknown fields"):
        Profile.from_dict({k: v for k, v in prof.to_dict().items() if k != "ops"})


def test_a_profile_of_another_model_is_refused_by_the_simulator():
    with pytest.raises(ValueError, match=r"no op\(s\) \['z'\]"):
        Simulator(profile(CHAIN_MS), graph(("z", "compute", ())), LAYOUT)


def test_spearman_and_the_model_error():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties share their rank
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    e = model_error([(1.0, 1.0), (1.1, 1.0), (0.9, 1.0), (0.5, 0.4)])
    assert e.n == 4 and e.median_abs == pytest.approx(0.1) and e.worst == pytest.approx(0.25)
    assert "over 4 schedule(s), median |error| 10.0%" in e.text()
    assert model_error([(1.0, math.nan)]).n == 0


# ---- measured on a model whose true times are known
@pytest.fixture
def paced_bench(tmp_path):
    from dynaflow.runtime import Bench, MeasureConfig, Workload

    return Bench(Workload(model="user_models:paced_units", num_decode=8),
                 config=MeasureConfig(warmup=1, repeats=5, peaks_dir=tmp_path / "peaks"))


def test_a_profile_measured_under_contention_is_used_but_not_cached(paced_bench, tmp_path, monkeypatch):
    from dynaflow.runtime.perfmodel import profiler

    monkeypatch.setattr(profiler.telemetry, "contention", lambda busy: "other processes used 90% of the CPUs")
    path = tmp_path / "p.json"
    with pytest.warns(UserWarning, match="under contention .* used for this run only, not cached"):
        prof, said = load_or_measure(paced_bench, path)
    assert said.endswith("under contention: not cached") and not path.exists() and set(prof.ops) == {"c1", "m1", "c2", "m2"}


def test_a_profile_of_the_paced_units_recovers_their_times_and_predicts_what_runs(paced_bench, tmp_path, monkeypatch):
    """The paced model's compute and memory 'kernels' sleep a known time under their unit's lock:
    the profile finds each op's time (at least its sleep), is cached and read back, and its predictions of three schedules (sequential; two nano-batches on two streams,
    whose compute kernels serialise on one unit; two nano-batches on one stream, each kernel paying
    its fixed time twice) come within 20% of what they measure, in the same order."""
    import user_models
    from dynaflow.runtime.perfmodel import profiler
    from dynaflow.runtime.telemetry import contention
    from dynaflow.runtime.plan import staggered_order

    bench = paced_bench
    busy = []
    monkeypatch.setattr(profiler.telemetry, "contention", lambda b: busy.append(contention(b)))  # cached either way
    path = tmp_path / "profiles" / "p.json"
    prof, said = load_or_measure(bench, path)
    assert "profile measured" in said and path.exists()
    whole = {"requests": 8}
    assert prof.busy["wall_s"] > 0
    for op, (fixed, per_row) in user_models.PACED_UNITS_MS.items():  # each at least its sleep (more on a busy CPU)
        assert prof.solo_ms(op, whole, None) >= 0.9 * (fixed + 8 * per_row)
    again, said = load_or_measure(bench, path)
    assert said.startswith("profile read from") and again == prof
    _, said = load_or_measure(bench, path, renew=True)
    assert "renewed" in said
    g = bench.executor.graph
    schedules = [Schedule(), Schedule(split_sizes=(4, 4), streams=(StreamSpec(), StreamSpec()),
                                      order=staggered_order(g, 2, 1, lambda op, b: b)),
                 Schedule(split_sizes=(4, 4))]
    sim = Simulator(prof, g, bench.case.layout)
    predicted = [sim.predict(s).ms for s in schedules]
    measured = [bench.measure(s) for s in schedules]
    if busy[0] or any(contention(m.telemetry["busy"]) for m in measured):
        return  # a busy CPU delays each thread's wake-ups as it likes: a profile measured then is never cached, nor trusted
    measured = [m.latency_ms for m in measured]
    for p, m in zip(predicted, measured):
        assert p == pytest.approx(m, rel=0.2)
    assert sorted(range(3), key=predicted.__getitem__) == sorted(range(3), key=measured.__getitem__) == [0, 1, 2]


def test_a_rescaled_line_takes_its_intercept_and_per_token_part_from_the_new_batch():
    """Another batch of the same op: the base's line (1 ms + 0.5 ms a token) against what the new
    batch measures (2 ms + 0.25 ms a token, at 16 tokens whole and 8 in each half): a = 2, b = 0.5;
    points that cannot tell the two parts apart (one size) give one common factor."""
    from dynaflow.runtime.perfmodel.profiler import _rescale

    a, b = _rescale([1.0, 0.5], ("decode",), [({"decode": 16}, 6.0), ({"decode": 8}, 4.0), ({"decode": 8}, 4.0)])
    assert (a, b) == (pytest.approx(2.0), pytest.approx(0.5))
    assert _rescale([1.0, 0.5], ("decode",), [({"decode": 16}, 18.0)]) == (pytest.approx(2.0), pytest.approx(2.0))
    assert _rescale([1.0, 0.5], ("decode",), [({"decode": 16}, 4.0), ({"decode": 8}, 6.0)]) == \
        (pytest.approx(10 / 14), pytest.approx(10 / 14))  # a negative per-token part: the common factor instead


def test_a_batch_of_a_profiled_family_gets_a_transferred_profile_and_others_do_not(tmp_path, monkeypatch):
    """A profile measured in full for one batch of the paced model lends its grid to another batch
    of the same family and kinds, in far fewer runs: the new batch's ops come out as a profile
    measured in full on that batch has them (at the whole batch, its halves and its quarters), the
    line says where it came from, and it is cached as transferred. A transferred profile never
    lends its grid, and another family or a renewal measures in full."""
    import user_models
    from dynaflow.runtime import Bench, MeasureConfig, Workload
    from dynaflow.runtime.perfmodel import profiler
    from dynaflow.runtime.telemetry import contention

    busy = []
    monkeypatch.setattr(profiler.telemetry, "contention", lambda b: busy.append(contention(b)))  # cached either way
    bench = {n: Bench(Workload(model="user_models:paced_units", num_decode=n),
                      config=MeasureConfig(warmup=1, repeats=5, peaks_dir=tmp_path / "peaks")) for n in (8, 16, 4)}
    folder = tmp_path / "profiles" / "hw"
    base, said = load_or_measure(bench[8], folder / "d8.json", family="paced", label="d8")
    assert said.startswith("profile measured") and base.family == "paced" and base.base is None
    moved, said = load_or_measure(bench[16], folder / "d16.json", family="paced", label="d16")
    assert said.startswith("profile transferred from d8's") and moved.base == "d8" and moved.family == "paced"
    assert moved.shares == base.shares and moved.interference == base.interference and moved.whole == {"requests": 16}
    assert moved.measured_s < base.measured_s / 2
    again, said = load_or_measure(bench[16], folder / "d16.json", family="paced")
    assert again == moved and "transferred from d8" in said  # cached as transferred, and said so
    _, said = load_or_measure(bench[4], folder / "d4.json", family="paced", label="d4")
    assert "transferred from d8's" in said  # the one measured in full lends, never d16's transfer
    full, said = load_or_measure(bench[16], folder / "d16-other.json", family="another")
    assert said.startswith("profile measured")
    _, said = load_or_measure(bench[4], folder / "d4.json", family="paced", renew=True)
    assert said.startswith("profile measured") and "renewed" in said
    if any(busy):
        return  # a busy CPU delays each thread's wake-ups as it likes: the times below are for a quiet one
    for op in user_models.PACED_UNITS_MS:
        for rows in (16, 8, 4):
            assert moved.solo_ms(op, {"requests": rows}, None) == pytest.approx(full.solo_ms(op, {"requests": rows}, None),
                                                                              rel=0.15), (op, rows)


# ---- on the simulated GPU (tests/fake_driver.py enforces the green-context rules)
from test_green_ctx import device  # noqa: E402,F401 - the simulated device, sm90 and sm80


class SimBench:
    """What the profiler reads of a Bench, on the simulated device: its executor, case, hardware and timelines."""

    def __init__(self, sim, fake) -> None:
        from dynaflow.runtime import Executor, Hardware, Workload
        from test_cuda_backend_sim import SimBackend
        from test_equivalence import CASES

        self.executor = Executor(Workload(**CASES["llama-tiny"]).build(), backend=SimBackend(sim))
        self.executor.profile_ops(flops_per_byte=4.0)
        self.case, self.device = self.executor.case, "cuda:0"
        self.hardware = Hardware(kind="cuda", name="sim", arch=".".join(map(str, fake.arch)), num_sms=fake.num_sms,
                                 memory_bytes=80 * 2**30)

    def timelines(self, schedules, *, runs=5):
        from dynaflow.runtime.timeline import record_timelines

        compiled = [self.executor.compile(s, sm_count=self.hardware.num_sms) for s in schedules]
        try:
            return record_timelines(compiled, {op.name: op.resource for op in self.executor.graph.ops}, runs=runs)
        finally:
            for c in compiled:
                c.close()


def test_on_a_gpu_the_profile_shares_are_the_devices_partition_steps(device):
    """sm90 (132 SMs, steps of 8): solo shares 32, 64, 96 SMs and the whole device; the partitioned
    calibration two streams of 64; sm80 (108 SMs, steps of 4): 24, 52, 80 and 108. Every share went
    through the fake driver's green contexts without a violation, and the tasks are issued by one
    host thread."""
    sim, fake = device
    bench = SimBench(sim, fake)
    prof = measure_profile(bench, runs=2)
    step = 8 if fake.arch >= (9, 0) else 4
    groups = fake.num_sms // step
    assert prof.issue == "one-issuer" and prof.total_share == fake.num_sms
    assert prof.shares == (*(g * step for g in (groups // 4, groups // 2, 3 * groups // 4)), fake.num_sms)
    assert {p[1] for p in prof.points} == set(prof.shares)
    assert set(prof.interference) == {"shared", "partitioned"} and not fake.violations, fake.violations
    sim_ = Simulator(prof, bench.executor.graph, bench.case.layout)
    assert sim_.predict(Schedule()).ms > 0 and sim_.headroom().bound_speedup >= 1
