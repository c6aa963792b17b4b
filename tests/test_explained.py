"""Verdicts a user can trust on a busy machine: a warm baseline, each run compared with its own,
timelines that compare like with like, contention recorded and said, every winner explained."""
import dataclasses

import optuna
import pytest

from dynaflow.runtime import Bench, Executor, MeasureConfig, Schedule, StreamSpec, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig, Verdict
from dynaflow.runtime.timeline import Span, Timeline, overlap, record_timelines
from dynaflow.tuner.analysis import trials_table
from dynaflow.tuner.commands import result_lines
from dynaflow.tuner.config import TuneConfig
from dynaflow.tuner.interrupt import StopFlag
from dynaflow.tuner.pool import InlinePool
from dynaflow.tuner.report import timeline_ratio
from dynaflow.tuner.show import describe
from dynaflow.tuner.study import WARM_RUNS, ensure_baseline, open_study
from dynaflow.tuner.session import study_config
from dynaflow.tuner.tune import tune_workload
from fakes import FakeTarget, split_landscape, tiny_context
from test_tuner import W

QUIET = {"wall_s": 2.0, "others_cpu_s": 0.1, "cpus": 2, "load1": 0.5}
BUSY = {"wall_s": 2.0, "others_cpu_s": 2.4, "cpus": 2, "load1": 6.0}  # others took 60% of the CPUs


class Telemetered(FakeTarget):
    """A fake whose measurements carry a load reading, whose latencies scale by `scale`, whose
    first `cold` sequential runs are slower, and which explains a schedule when `why` is given."""

    def __init__(self, *, busy=QUIET, scale=1.0, cold=(), drift=False, why=None) -> None:
        super().__init__(tiny_context(), lambda s: scale * split_landscape(s))
        self.busy, self.cold, self.drift, self.why, self.sequential_runs = busy, list(cold), drift, why, 0

    def measure(self, schedule, *, on_sample=None, time_limit_s=None):
        m = super().measure(schedule, on_sample=on_sample, time_limit_s=time_limit_s)
        if schedule.is_sequential:
            self.sequential_runs += 1
            factor = (self.cold.pop(0) if self.cold else 1.0) * (0.8 ** self.sequential_runs if self.drift else 1.0)
            if factor != 1.0 and m.ok:
                m = dataclasses.replace(m, latency_ms=m.latency_ms * factor, tokens_per_s=m.tokens_per_s / factor,
                                        samples_ms=tuple(x * factor for x in m.samples_ms),
                                        latency_p10_ms=m.latency_p10_ms * factor, latency_p90_ms=m.latency_p90_ms * factor)
        return dataclasses.replace(m, telemetry={"busy": dict(self.busy)})

    def explain(self, schedule):
        return self.why


@pytest.fixture(autouse=True)
def faulty_space(monkeypatch, tmp_path):
    """Trial n proposes candidate n (a split of its own); candidates beat the baseline's 10 ms."""
    import shutil
    from pathlib import Path

    from dynaflow import search_spaces

    shutil.copy(Path(__file__).parent / "faulty_space.py", tmp_path / "faulty.py")
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])


def config(tmp_path, **kw):
    base = dict(workloads=(W,), space="faulty", trials=6, prune=False, storage=f"sqlite:///{tmp_path}/s.db", store_root=tmp_path,
                progress=False, trial_timeout_s=5.0, seed=0)
    return TuneConfig(**{**base, **kw})


def run(target, cfg, stop=()):
    [result] = tune_workload(W, [(target, InlinePool(target))], cfg, log=lambda *a: None, stop=stop)
    return result


def test_the_baseline_is_warmed_until_two_medians_agree(tmp_path):
    cfg = config(tmp_path)
    study = open_study("s", study_config(cfg))
    target = Telemetered(cold=(5.0, 2.0))  # a cold process: 50 ms, then 20, then the real 10
    m, number = ensure_baseline(study, target, cfg.trial_timeout_s, log=lambda *a: None)
    assert m.latency_ms == pytest.approx(10.0, rel=0.01) and target.sequential_runs == 4
    trial = study.get_trials(deepcopy=False)[number]
    assert trial.user_attrs["warm_runs"] == 4 and trial.value == 1.0  # the paired scale: sequential is 1
    assert min(trial.intermediate_values.values()) == pytest.approx(1.0, abs=0.01)  # samples over its own figure


def test_a_baseline_that_never_settles_is_said_to_drift(tmp_path):
    cfg, lines = config(tmp_path), []
    target = Telemetered(drift=True)  # 20% faster every run
    ensure_baseline(open_study("s", study_config(cfg)), target, cfg.trial_timeout_s, log=lines.append)
    assert target.sequential_runs == WARM_RUNS
    assert any(line.startswith(f"baseline still drifting after {WARM_RUNS} runs (the last two figures differ by 20%)")
               for line in lines)


def test_each_run_is_compared_with_the_baseline_measured_next_to_it(tmp_path):
    cfg = config(tmp_path, trials=4)
    run(Telemetered(scale=1.0), cfg)
    run(Telemetered(scale=3.0), config(tmp_path, trials=8))  # the machine is 3x slower in the second run
    study = optuna.load_study(study_name=optuna.get_all_study_names(cfg.storage.url)[0], storage=cfg.storage.url)
    df = trials_table(study)
    baselines = df[df.baseline]
    assert len(baselines) == 2  # one per run
    search = df[~df.baseline & (df.state == "COMPLETE")]
    assert len(search) == 8
    expected = [10.0 / split_landscape(Schedule.from_json(j)) for j in search.schedule]
    assert list(search.speedup) == pytest.approx(expected, rel=0.01)  # not 3x off in the second run
    assert set(search.baseline_trial) == set(baselines.number)


def test_ctrl_c_before_the_first_trial_concludes_nothing(tmp_path):
    stop = StopFlag()
    stop.requested = True
    result = run(Telemetered(), config(tmp_path), stop=stop)
    assert result.interrupted and result.verdict.kind is Verdict.INCONCLUSIVE
    assert result.record.verdict is Verdict.INCONCLUSIVE and result.record.schedule.is_sequential
    text = result_lines(result)
    assert "inconclusive: interrupted before the confirmation; sequential kept, nothing concluded" in text
    assert "no candidate completed" not in text


def test_a_busy_machine_concludes_nothing_unless_contention_is_accepted_and_then_says_so(tmp_path):
    result = run(Telemetered(busy=BUSY), config(tmp_path))
    assert result.record.verdict is Verdict.INCONCLUSIVE
    said = result_lines(result)
    # 8 busy rounds per candidate: after them 4 more could not bring the 5 quiet rounds a verdict needs
    assert all(len(c.comparison.rounds) == 8 for c in result.verdict.candidates)
    shown = describe(ScheduleStore(StoreConfig(root=tmp_path)).read(result.path))
    assert "verdict    inconclusive: runs the sequential schedule; the best candidates' 24 paired rounds all ran " \
           "while the machine was busy (no evidence)" in shown
    assert "machine    busy: all 24 paired rounds left out of the evidence" in shown
    assert "inconclusive: the machine was busy (24 of 24 paired rounds ran while the machine was busy: other " \
           "processes used 60% of the 2 CPU(s) (load average 6))" in said
    cfg = config(tmp_path, accept_contention=True, storage=f"sqlite:///{tmp_path}/t.db")
    result = run(Telemetered(busy=BUSY), cfg)
    rec = ScheduleStore(StoreConfig(root=tmp_path)).read(result.path)
    assert rec.verdict is Verdict.WINNER
    assert rec.contended == "5 of 5 paired rounds ran while the machine was busy: other processes used 60% of the " \
                            "2 CPU(s) (load average 6)"
    # every measurement read 2 s; 5 rounds of 2 measurements for each of the 3 candidates
    assert rec.busy["wall_s"] == pytest.approx(2.0 * 2 * 5 * cfg.confirm_top)
    assert f"measured under contention (accepted): {rec.contended}" in result_lines(result)
    assert f"machine    under contention (accepted): {rec.contended}" in describe(rec)


def test_a_quiet_confirmation_is_said_to_be_quiet(tmp_path):
    result = run(Telemetered(busy=QUIET), config(tmp_path))
    rec = ScheduleStore(StoreConfig(root=tmp_path)).read(result.path)
    assert rec.contended is None and "contention" not in result_lines(result)
    assert "machine    quiet enough (other processes used 2% of the CPUs" in describe(rec)


WHY = {"makespan_ms": 8.0, "overlapped_ms": 3.0, "by_resources": {"compute+memory": 2.5, "compute+compute": 0.5},
       "top": [{"ops": ["mlp/0", "attn/1"], "ms": 2.5}]}


def test_a_stored_winner_says_what_overlapped(tmp_path):
    result = run(Telemetered(why=WHY), config(tmp_path))
    assert result.record.verdict is Verdict.WINNER
    rec = ScheduleStore(StoreConfig(root=tmp_path)).read(result.path)  # through the file and its checks
    assert rec.overlap == WHY
    assert ("why        3.00 of 8.00 ms with two or more streams busy (compute+memory 2.50 ms, compute+compute "
            "0.50 ms); longest: mlp/0 | attn/1 2.50 ms") in describe(rec)


def test_a_bad_overlap_in_a_record_names_the_field(tmp_path):
    result = run(Telemetered(why=WHY), config(tmp_path))
    store = ScheduleStore(StoreConfig(root=tmp_path))
    import json
    from pathlib import Path

    data = json.loads(Path(result.path).read_text())
    data["overlap"]["top"][0]["ops"] = "mlp/0"
    Path(result.path).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"record.overlap.top\[0\].ops must be two op/nano-batch names"):
        store.read(Path(result.path))


def test_overlap_adds_up_what_ran_at_the_same_time_per_pair_of_resource_classes():
    spans = (Span(op="mlp", nano=0, stream=0, start_ms=0.0, end_ms=4.0, resource="compute"),
             Span(op="attn", nano=1, stream=1, start_ms=1.0, end_ms=3.0, resource="memory"),
             Span(op="norm", nano=0, stream=0, start_ms=4.0, end_ms=5.0, resource="memory"),
             Span(op="o", nano=1, stream=1, start_ms=5.0, end_ms=6.0, resource="compute"))
    o = overlap(Timeline(label="x", spans=spans))
    assert o == {"makespan_ms": 6.0, "overlapped_ms": 2.0, "by_resources": {"compute+memory": 2.0},
                 "top": [{"ops": ["mlp/0", "attn/1"], "ms": 2.0}]}
    assert overlap(Timeline(label="seq", spans=spans[:1] + spans[2:3]))["overlapped_ms"] == 0.0


def test_with_more_than_two_streams_each_instant_counts_once():
    """Three streams busy at once: the time is one "compute+compute+memory" span, never three
    pairs, so the figures add up to the time with two or more streams busy, within the wall time."""
    spans = (Span(op="a", nano=0, stream=0, start_ms=0.0, end_ms=4.0, resource="compute"),
             Span(op="b", nano=1, stream=1, start_ms=0.0, end_ms=4.0, resource="compute"),
             Span(op="c", nano=2, stream=2, start_ms=1.0, end_ms=3.0, resource="memory"),
             Span(op="d", nano=3, stream=3, start_ms=3.5, end_ms=5.0, resource="copy"))
    o = overlap(Timeline(label="x", spans=spans))
    assert o["by_resources"] == {"compute+compute": 1.5, "compute+compute+memory": 2.0, "compute+compute+copy": 0.5}
    assert sum(o["by_resources"].values()) == o["overlapped_ms"] == 4.0 <= o["makespan_ms"]


def test_a_real_two_stream_schedule_overlaps_and_sequential_does_not():
    bench = Bench(Workload(model="user_models:paced_block", num_decode=8), config=MeasureConfig(warmup=1, repeats=2))
    names = bench.executor.graph.names
    two = Schedule(split_sizes=(4, 4), streams=(StreamSpec(), StreamSpec()), label="2x2",
                   order=tuple(dataclasses.replace(s) for s in _order(names)))
    assert bench.explain(two)["overlapped_ms"] > 0  # the paced 'kernels' of the two nano-batches sleep together
    assert bench.explain(Schedule())["overlapped_ms"] == 0


def _order(names):
    from dynaflow.runtime import Step

    return [Step(op=o, nano=b, stream=b) for o in names for b in (0, 1)]


class Logged:
    """A compiled schedule that logs each call, so the order of runs can be read."""

    def __init__(self, compiled, name, log) -> None:
        self._c, self._name, self._log = compiled, name, log

    def __getattr__(self, attr):
        return getattr(self._c, attr)

    def __call__(self):
        self._log.append(self._name)
        return self._c()


def test_timelines_are_warmed_and_their_runs_interleaved():
    ex = Executor(Workload(model="llama-tiny", num_decode=4, context_len=16).build())
    log = []
    a = Logged(ex.compile(Schedule()), "a", log)
    b = Logged(ex.compile(Schedule(split_sizes=(2, 2), label="split")), "b", log)
    seq, split = record_timelines([a, b], runs=3, warmup=2)
    assert log == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]  # two warm-ups each, then 3 runs, order alternating
    assert len(seq.makespans_ms) == len(split.makespans_ms) == 3
    assert seq.label == "sequential" and split.label == "split"


def _tl(makespans):
    return Timeline(label="", spans=(Span(op="x", nano=0, stream=0, start_ms=0.0, end_ms=max(makespans)),),
                    makespans_ms=tuple(makespans))


def test_the_timeline_ratio_is_set_beside_the_verdict_and_disagreement_said():
    seq, best = _tl([20.0, 20.0, 21.0, 20.5]), _tl([10.0, 10.0, 10.5, 10.2])
    agree = timeline_ratio([seq, best], {"verdict": "winner", "speedup": 2.0, "best_speedup": 2.0, "low": 1.9,
                                         "high": 2.1})
    assert "2.0" in agree and "the confirmation measured it at 2.000x (1.900-2.100x) (winner)" in agree
    assert "98% interval" in agree and "over 4 paired runs" in agree and "disagree" not in agree
    differ = timeline_ratio([seq, best], {"verdict": "sequential_best", "speedup": 1.0, "best_speedup": 1.01,
                                          "low": 0.95, "high": 1.02})
    assert "1.010x (0.950-1.020x) (sequential best): they disagree beyond both intervals" in differ
    # a slower best candidate agrees with "sequential best": the same schedule, the same figure
    slower = _tl([9.0, 9.1, 8.9, 9.0])
    said = timeline_ratio([slower, best], {"verdict": "sequential_best", "speedup": 1.0, "best_speedup": 0.88,
                                           "low": 0.85, "high": 0.9})
    assert "disagree" not in said


def test_the_report_says_why_the_winner_won_and_how_busy_the_machine_was(tmp_path):
    from dynaflow.tuner.report import write_report

    cfg = config(tmp_path, accept_contention=True)
    run(Telemetered(why=WHY, busy=BUSY), cfg)
    text = write_report(cfg.storage.url, tmp_path / "report", store_root=tmp_path, timelines=False).read_text()
    assert "- why the winner won: 3.00 of 8.00 ms with two or more streams busy (compute+memory 2.50 ms" in text
    assert "- machine during the confirmation: under contention (accepted): 5 of 5 paired rounds ran while the " \
           "machine was busy: other processes used 60% of the 2 CPU(s)" in text
    assert "x over the sequential run beside it (trial" in text and "one paired round, unconfirmed" in text


NO_OVERLAP = {"makespan_ms": 8.0, "overlapped_ms": 0.1, "by_resources": {"compute+compute": 0.1},
              "top": [{"ops": ["mlp/0", "mlp/1"], "ms": 0.1}]}


def test_a_winner_without_overlap_says_so_and_needs_quiet_rounds(tmp_path):
    """A winner whose timeline shows (almost) no overlap is said to be one, with what differs
    from sequential; on busy rounds accepted by the user it is not stored as a winner."""
    result = run(Telemetered(why=NO_OVERLAP), config(tmp_path))
    rec = ScheduleStore(StoreConfig(root=tmp_path)).read(result.path)
    assert rec.verdict is Verdict.WINNER
    assert rec.no_overlap.startswith("won without overlap: 0.10 of 8.00 ms with two or more streams busy; it differs "
                                     "from sequential in 2 nano-batches [")
    assert rec.no_overlap in describe(rec) and rec.no_overlap in result_lines(result)
    busy = run(Telemetered(why=NO_OVERLAP, busy=BUSY),
               config(tmp_path, accept_contention=True, storage=f"sqlite:///{tmp_path}/t.db"))
    assert busy.verdict.kind is Verdict.INCONCLUSIVE and "stored only on quiet rounds" in busy.verdict.reason
    assert busy.record.verdict is Verdict.WINNER and "conclusive" in busy.kept  # the quiet winner stays


def test_one_estimator_from_the_start_line_to_the_record(tmp_path):
    """The printed baseline, the progress bar's best, the study's trial values and the stored
    figures all come from the same paired figures (the lower quartile of a measurement's samples)."""
    from dynaflow.tuner.paired import round_ms
    from dynaflow.tuner.progress import Progress
    from dynaflow.tuner.session import start

    cfg, lines = config(tmp_path), []
    target = Telemetered()
    session = start(W, target, cfg, log=lines.append)
    base = round_ms(FakeTarget(tiny_context(), split_landscape).measure(Schedule()).samples_ms)
    tokens = target.space_context().layout.num_tokens
    assert f"baseline {tokens / base * 1e3:,.0f} tokens/s" in lines[0]
    session.progress.close()
    result = run(target, config(tmp_path, storage=f"sqlite:///{tmp_path}/t.db"))
    rec, v = result.record, result.verdict
    assert rec.baseline_tokens_per_s == pytest.approx(tokens / base * 1e3)  # a deterministic fake: the same figure
    assert rec.tokens_per_s == pytest.approx(rec.baseline_tokens_per_s * rec.speedup)
    assert rec.speedup == pytest.approx(v.winner.interval.speedup) and rec.speedup_interval[0] <= rec.speedup
    study = optuna.load_study(study_name=result.study, storage=f"sqlite:///{tmp_path}/t.db")
    winner = study.get_trials(deepcopy=False)[v.winner.trial]
    assert winner.value == pytest.approx(v.winner.search_speedup)  # the trial's value is its paired speedup
    bar = Progress(total=4, desc="x", enabled=False)
    bar.update(dataclasses.replace(FakeTarget(tiny_context(), split_landscape).measure(Schedule(split_sizes=(3, 29))),
                                   baseline_samples_ms=(10.0,) * 6))
    assert bar.best == pytest.approx(10.0 / 8.0, rel=0.01)  # paired, not tokens/s over a run's baseline


def test_the_reports_outcome_counts_add_up_to_what_it_says(tmp_path):
    from dynaflow.tuner.report import write_report

    cfg = config(tmp_path, trials=6)
    run(Telemetered(), cfg)
    text = write_report(cfg.storage.url, tmp_path / "report", store_root=tmp_path, timelines=False).read_text()
    import re

    line = next(x for x in text.splitlines() if x.startswith("- trials: "))
    distinct = int(re.search(r"(\d+) distinct schedules measured \(([^)]*)\)", line).group(1))
    counts = re.search(r"distinct schedules measured \(([^)]*)\)", line).group(1)
    assert distinct == sum(int(part.split()[-1]) for part in counts.split(", ")) == 6
