"""The tuning loop on a fake measurer with a known landscape: it finds the optimum, records
every failure type and keeps going, stores only real winners, and warm-starts neighbours."""
import json

import optuna
import pytest

from dynaflow.runtime import Schedule, TrialOutcome, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.tuner.config import TuneConfig
from dynaflow.tuner.study import counts_toward_budget
from dynaflow.tuner.tune import tune
from fakes import FakeTarget, tiny_context

W = Workload(model="llama-tiny", num_decode=32, context_len=16, prefill_tokens=32, prefill_chunk=16)
OPTIMUM = "dbo:stagger-2:20/14"


def dbo_landscape(schedule: Schedule) -> float:
    """Latency in ms: the sequential baseline 10; DBO best at stagger-2 with 20 requests first."""
    if schedule.is_sequential:
        return 10.0
    _, template, sizes = schedule.label.split(":")
    first = int(sizes.split("/")[0])
    return 8.0 + (0.0 if template == "stagger-2" else 1.0) + 0.1 * abs(first - 20)


def config(tmp_path, **kw) -> TuneConfig:
    base = dict(workloads=(W,), space="dbo", trials=40, storage=f"sqlite:///{tmp_path}/s.db",
                store_root=tmp_path, progress=False, seed=0)
    return TuneConfig(**{**base, **kw})


def _study(cfg, measurer):
    name = optuna.get_all_study_names(cfg.storage.url)[0]
    return optuna.load_study(study_name=name, storage=cfg.storage.url)


def test_search_reaches_the_optimum_within_budget(tmp_path):
    cfg = config(tmp_path, trials=25)
    measurer = FakeTarget(tiny_context(), dbo_landscape)
    [result] = tune(cfg, make_target=lambda w: measurer, log=lambda *a: None)
    assert result.record.schedule.label == OPTIMUM
    assert not result.record.sequential_best
    assert result.record.speedup == pytest.approx(10.0 / 8.0, rel=0.01)
    study = _study(cfg, measurer)
    assert study.best_trial.user_attrs["result"]["label"] == OPTIMUM
    counted = [t for t in study.trials if counts_toward_budget(t)]
    assert len(counted) == result.distinct == 25  # the budget counts distinct schedules ...
    keys = [Schedule.from_json(t.user_attrs["result"]["schedule"]).key() for t in counted]
    assert len(set(keys)) == 25  # ... each measured once
    dups = [t for t in study.trials if t.user_attrs.get("result", {}).get("duplicate")]
    assert all(Schedule.from_json(t.user_attrs["result"]["schedule"]).key() in keys for t in dups)


def test_a_budget_larger_than_the_space_ends_when_the_search_converges(tmp_path):
    """The dbo space holds 30 distinct schedules on this batch: asked for 60, the run stops once
    proposals keep repeating measured schedules, having measured each schedule at most once."""
    target = FakeTarget(tiny_context(), dbo_landscape)
    [result] = tune(config(tmp_path, trials=60), make_target=lambda w: target, log=lambda *a: None)
    assert result.exhausted and 20 <= result.distinct <= 30
    # a deterministic landscape decides every candidate at the first look: 5 paired rounds each
    confirmation = 2 * 5 * len(result.verdict.candidates)
    # each schedule timed once, beside a sequential run of its own; the warm baseline twice
    assert target.calls == 2 * result.distinct + 2 + confirmation


def test_every_failure_type_is_recorded_and_the_study_goes_on(tmp_path):
    failures = {4: TrialOutcome.INCORRECT, 5: TrialOutcome.OOM, 6: TrialOutcome.TIMEOUT,
                7: TrialOutcome.CRASHED, 8: TrialOutcome.INVALID, 9: RuntimeError}
    cfg = config(tmp_path, trials=20)
    measurer = FakeTarget(tiny_context(), dbo_landscape, failures=failures, fail_candidates=True)
    [result] = tune(cfg, make_target=lambda w: measurer, log=lambda *a: None)
    study = _study(cfg, measurer)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and not t.user_attrs["result"].get("duplicate")]  # a re-proposed incorrect schedule is reused
    outcomes = sorted(t.user_attrs["result"]["outcome"] for t in failed)
    assert outcomes == sorted(["incorrect", "oom", "timeout", "crashed", "invalid", "crashed"])
    assert any("RuntimeError: injected at call 9" in t.user_attrs["result"]["message"] for t in failed)
    assert len([t for t in study.trials if counts_toward_budget(t)]) == 20  # budget still met
    assert result.outcomes["incorrect"] == 1 and result.outcomes["crashed"] == 2


def test_no_false_winner_when_nothing_beats_the_noise(tmp_path):
    """Candidates as fast as the baseline, each measurement off by up to 5% as a whole (the
    machine's state per measurement): the record holds the sequential schedule."""
    import random

    def flat(schedule):
        return 10.0

    measurer = FakeTarget(tiny_context(), flat)
    measurer.samples = 10
    base_measure, rng = measurer.measure, random.Random(0)

    def noisy(schedule, **kw):
        m = base_measure(schedule, **kw)
        if m.ok:  # one factor per measurement: its samples share the machine's state
            factor = 1 + 0.1 * (rng.random() - 0.5)
            object.__setattr__(m, "samples_ms", tuple(s * factor for s in m.samples_ms))
        return m

    measurer.measure = noisy
    [result] = tune(config(tmp_path, trials=6), make_target=lambda w: measurer, log=lambda *a: None)
    assert result.record.sequential_best and result.record.schedule == Schedule()
    assert result.record.verdict in ("sequential_best", "inconclusive")
    assert result.record.speedup == 1.0 and result.record.speedup_spread > 0.02
    saved = json.loads((tmp_path / "schedules" / H100_KEY / f"{W.key}.json").read_text())
    assert saved["sequential_best"] is True and saved["trial"] is None


H100_KEY = tiny_context().hardware.key


def test_pruner_stops_clearly_slower_candidates(tmp_path):
    def slow(schedule):
        return 10.0 if schedule.is_sequential else 20.0

    measurer = FakeTarget(tiny_context(), slow, samples=12)
    [result] = tune(config(tmp_path, trials=5), make_target=lambda w: measurer, log=lambda *a: None)
    assert result.outcomes.get("pruned", 0) >= 4


def test_neighbouring_winners_are_enqueued_as_warm_starts(tmp_path):
    measurer = FakeTarget(tiny_context(), dbo_landscape)
    tune(config(tmp_path, trials=25), make_target=lambda w: measurer, log=lambda *a: None)
    stored = ScheduleStore(StoreConfig(root=tmp_path)).read(tmp_path / "schedules" / H100_KEY / f"{W.key}.json")
    assert stored.params
    other = Workload(model="llama-tiny", num_decode=32, context_len=32, prefill_tokens=32, prefill_chunk=16)
    logs = []
    target2 = FakeTarget(tiny_context(), dbo_landscape)
    tune(config(tmp_path, workloads=(other,), trials=1), make_target=lambda w: target2, log=logs.append)
    assert "1 warm start(s) enqueued" in logs[0]
    name = [n for n in optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db") if other.key in n][0]
    first = [t for t in optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/s.db").trials
             if not t.user_attrs.get("baseline")][0]
    assert first.params == stored.params


def test_bad_config_fields_are_named():
    with pytest.raises(ValueError, match="--trials or --timeout-s"):
        TuneConfig(workloads=(W,), trials=None)
    with pytest.raises(ValueError, match="--sampler must be one of"):
        TuneConfig(workloads=(W,), sampler="bayes")
    with pytest.raises(ValueError, match="--storage must be an Optuna storage URL"):
        TuneConfig(workloads=(W,), storage="results/db.sqlite")


def test_another_space_does_not_overwrite_a_better_stored_winner(tmp_path):
    measurer = FakeTarget(tiny_context(), dbo_landscape)
    [first] = tune(config(tmp_path, trials=25), make_target=lambda w: measurer, log=lambda *a: None)
    assert first.record.space == "dbo" and first.record.speedup > 1.2
    flat = FakeTarget(tiny_context(), lambda s: 10.0)  # the sequential space finds nothing better
    [second] = tune(config(tmp_path, space="sequential", trials=2), make_target=lambda w: flat, log=lambda *a: None)
    assert second.record.space == "dbo" and second.record.schedule == first.record.schedule
    stored = ScheduleStore(StoreConfig(root=tmp_path)).read(tmp_path / "schedules" / H100_KEY / f"{W.key}.json")
    assert stored.space == "dbo"


def test_a_killed_worker_and_a_duplicate_are_typed_fields_not_wording():
    """A schedule is poison because its record says killed_worker, whatever its message says; a
    result is a duplicate because it says duplicate, not because its message starts a certain way."""
    from optuna.trial import TrialState, create_trial

    from dynaflow.runtime import Measurement, Schedule, StreamSpec, TrialOutcome
    from dynaflow.tuner.records import TrialMeasurement, duplicate
    from dynaflow.tuner.study import RESULT, Known, trial_record

    killer = Schedule(split_sizes=(1, 1), streams=(StreamSpec(), StreamSpec()), label="killer")
    worded = Schedule(split_sizes=(1, 1), label="worded")
    study = optuna.create_study()
    for schedule, m in ((killer, TrialMeasurement(outcome=TrialOutcome.CRASHED, message="segfault", killed_worker=True)),
                        (worded, Measurement(outcome=TrialOutcome.CRASHED, message="the worker's input was bad"))):
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={RESULT: trial_record(schedule, m, None)}))
    known = Known(study)
    assert known.poison == {killer.key()}  # typed: the message no longer decides
    worded_ok = Measurement(outcome=TrialOutcome.OK, tokens_per_s=1.0, message="duplicate schedule, as it happens")
    assert not duplicate(worded_ok)
    known.remember(worded, worded_ok)
    assert known.reuse(worded).duplicate and trial_record(worded, known.reuse(worded), None)["duplicate"] is True


def test_what_only_the_tuner_knows_of_a_trial_is_not_in_the_runtime():
    """A server imports runtime/: its Measurement and TrialOutcome say what a measure found, and
    nothing of a study (reused results, killed workers, interrupted or skipped trials)."""
    import dataclasses

    from dynaflow.runtime import Measurement
    from dynaflow.tuner.records import StudyOutcome, TrialMeasurement

    assert not {"duplicate", "killed_worker"} & {f.name for f in dataclasses.fields(Measurement)}
    assert not {o.value for o in StudyOutcome} & {o.value for o in TrialOutcome}
    m = Measurement(outcome=TrialOutcome.OK, tokens_per_s=2.0, samples_ms=(1.0,))
    held = TrialMeasurement.of(m, duplicate=True)
    assert held.duplicate and not held.killed_worker and held.samples_ms == (1.0,) and held.ok


def test_studies_written_before_the_typed_field_still_know_their_poison():
    from optuna.trial import TrialState, create_trial

    from dynaflow.runtime import Schedule, StreamSpec
    from dynaflow.tuner.study import RESULT, Known

    old = Schedule(split_sizes=(1, 1), streams=(StreamSpec(), StreamSpec()), label="old")
    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={RESULT: {
        "outcome": "crashed", "message": "worker died: ActorDiedError", "schedule": old.to_json()}}))
    assert Known(study).poison == {old.key()}


def test_a_search_stopped_by_its_time_budget_says_so(tmp_path):
    from dynaflow.tuner.commands import result_lines
    from fakes import make_sleeping_fake

    target = make_sleeping_fake(W, sleep_s=0.05)
    [result] = tune(config(tmp_path, trials=500, timeout_s=1.0), make_target=lambda w: target, log=lambda *a: None)
    assert result.timed_out and result.distinct < 500
    assert "; the search stopped at --timeout-s" in result_lines(result)
    [full] = tune(config(tmp_path / "b", trials=3, storage=f"sqlite:///{tmp_path}/b.db"),
                  make_target=lambda w: target, log=lambda *a: None)
    assert not full.timed_out and "--timeout-s" not in result_lines(full)


def test_one_set_of_measure_defaults_wherever_the_tuner_is_called_from():
    """The API's TuneConfig and every CLI command that measures start from MeasureConfig's defaults."""
    from dynaflow.runtime import MeasureConfig
    from dynaflow.tuner.commands import build_parser

    default = MeasureConfig()
    assert TuneConfig(workloads=(W,)).measure == default
    parser = build_parser()
    for command in ("tune", "measure"):
        args = parser.parse_args([command, "--workload", "d4x16"] if command == "measure" else [command])
        assert (args.warmup, args.repeats) == (default.warmup, default.repeats), command


def test_a_trial_record_round_trips_through_the_studys_json():
    """The typed record writes the study's JSON and reads it back equal, however it is filled; an
    older study's record (no killed_worker, no duplicate) reads with the defaults, and a key this
    version does not know is ignored, not an error."""
    from dynaflow.runtime import StreamSpec
    from dynaflow.tuner.records import TrialMeasurement, TrialRecord
    from dynaflow.tuner.study import trial_record

    schedule = Schedule(split_sizes=(4, 4), streams=(StreamSpec(), StreamSpec()), label="two")
    full = TrialMeasurement(outcome=TrialOutcome.OK, message="ok", latency_ms=2.0, latency_p10_ms=1.9,
                            latency_p90_ms=2.2, samples_ms=(2.0, 2.1), baseline_samples_ms=(3.0, 3.1), tokens_per_s=10.0,
                            peak_bytes=5, efficiency=0.5, telemetry={"busy": {"share": 0.1}}, notes={"streams": "2"},
                            tolerance={"rtol": 1e-3, "atol": 1e-4}, duplicate=True)
    for m in (full, TrialMeasurement(outcome=TrialOutcome.CRASHED, message="died", killed_worker=True)):
        stored = json.loads(json.dumps(trial_record(schedule, m, "w0", 3)))
        record = TrialRecord.from_json(stored)
        assert record.to_json() == stored
        assert record.schedule_obj() == schedule and record.worker == "w0" and record.baseline_trial == 3
    assert TrialRecord.from_json(stored).killed and not TrialRecord.from_json(trial_record(schedule, full, None)).killed
    assert TrialRecord.from_json(trial_record(schedule, full, None)).speedup == pytest.approx(3.0 / 2.0)
    old = {"outcome": "timeout", "message": "worker hung; replaced", "schedule": schedule.to_json(), "from_later": 1}
    record = TrialRecord.from_json(old)
    assert record.killed_worker is None and record.killed and not record.duplicate and record.samples_ms == ()
    assert TrialRecord.from_json(None).outcome is None and TrialRecord.from_json(None).to_json() == {}
