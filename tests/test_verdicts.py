"""Three verdicts from paired rounds, each stored as such; busy rounds are no evidence; nothing is
concluded from nothing; an inconclusive or contended run never replaces a conclusive quiet
record; a failing baseline is one line."""
import json
import random

import pytest

from dynaflow.runtime import Measurement, Schedule, TrialOutcome, Workload
from dynaflow.tuner.cli import main
from dynaflow.tuner.confirm import Candidate, judge
from dynaflow.tuner.config import TuneConfig
from dynaflow.tuner.paired import Comparison, Decision, Plan, Round
from dynaflow.tuner.tune import tune
from fakes import FakeTarget, tiny_context
from cli_output import error_lines

W = Workload(model="llama-tiny", num_decode=32, context_len=16, prefill_tokens=32, prefill_chunk=16)


def comparison(ratios, plan: Plan, busy=()) -> Comparison:
    """Rounds with these speedups (baseline 10 ms), decided the way `compare` decides them."""
    c = Comparison()
    for i, r in enumerate(ratios):
        c = Comparison(rounds=c.rounds + (Round(baseline_ms=10.0, candidate_ms=10.0 / r,
                                                busy="others used 60%" if i in busy else None),))
        decision = plan.decide(c, last=len(c.rounds) == plan.max_rounds)
        c = Comparison(rounds=c.rounds, decision=decision)
        if decision is not Decision.UNDECIDED:
            break
    return c


def candidate(c: Comparison, plan: Plan, trial: int = 1) -> Candidate:
    return Candidate(trial=trial, schedule=Schedule(split_sizes=(1, 1)), comparison=c, interval=plan.final(c))


def noisy(mean: float, noise: float, n: int = 12, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [mean * (1 + noise * (rng.random() - 0.5)) for _ in range(n)]


@pytest.mark.parametrize("mean, noise, verdict", [
    (1.25, 0.05, "winner"),  # 25% faster, 5% noise per round: the interval lies above 1
    (0.85, 0.05, "sequential_best"),  # 15% slower: it cannot be 3% faster
    (1.0, 0.01, "sequential_best"),  # equal, little noise: the interval ends below 1.03
    (1.02, 0.6, "inconclusive"),  # maybe 3% faster, 60% noise: the interval spans 1 and 1.03
])
def test_three_verdicts_from_the_rounds(mean, noise, verdict):
    plan = Plan(candidates=1)
    c = comparison(noisy(mean, noise), plan)
    v = judge((candidate(c, plan),), plan)
    assert v.kind == verdict, (v.best_candidate.interval, c.decision)
    assert v.schedule.is_sequential == (verdict != "winner")
    assert len(c.rounds) >= plan.min_rounds  # never decided on fewer rounds than the minimum


def test_the_interval_comes_from_the_rounds_not_from_pooled_samples():
    """Three rounds of a schedule that won each by a hair give no verdict, however many samples
    each round held: three observations."""
    plan = Plan(candidates=1, max_rounds=3, min_rounds=3)
    c = comparison([1.2, 1.9, 1.05], plan)
    iv = plan.final(c)
    assert iv.rounds == 3 and iv.low < 1.0  # a t-interval over 3 rounds is wide
    assert judge((candidate(c, plan),), plan).kind == "inconclusive"


def test_busy_rounds_are_no_evidence_for_a_winner():
    plan = Plan(candidates=1)
    always_busy = comparison([1.4] * 12, plan, busy=range(12))
    v = judge((candidate(always_busy, plan),), plan)
    assert v.kind == "inconclusive" and "the machine was busy (12 of 12 paired rounds" in v.reason
    assert "--accept-contention" in v.reason and v.busy_rounds == 12
    some_busy = comparison([1.4] * 12, plan, busy=(0, 2, 4))
    v = judge((candidate(some_busy, plan),), plan)
    assert v.kind == "winner" and len(some_busy.evidence()) == plan.min_rounds and not v.contended
    accepted = Plan(candidates=1, accept_contention=True)
    v = judge((candidate(comparison([1.4] * 12, accepted, busy=range(12)), accepted),), accepted)
    assert v.kind == "winner" and "5 of 5 paired rounds ran while the machine was busy" in v.contended


def test_sequential_best_needs_every_candidate_excluded():
    plan = Plan(candidates=2)
    slow, undecided = comparison([0.8] * 12, plan), comparison(noisy(1.02, 0.6, seed=3), plan)
    assert judge((candidate(slow, plan), candidate(undecided, plan, 2)), plan).kind == "inconclusive"
    assert judge((candidate(slow, plan), candidate(slow, plan, 2)), plan).kind == "sequential_best"
    failed = Comparison(failed="incorrect: output differs", decision=Decision.FAILED)
    assert judge((candidate(slow, plan), candidate(failed, plan, 2)), plan).kind == "sequential_best"
    v = judge((candidate(failed, plan),), Plan(candidates=1))
    assert v.kind == "inconclusive" and "every candidate failed when re-measured" in v.reason


def _config(tmp_path, **kw):
    return TuneConfig(**{**dict(workloads=(W,), space="dbo", trials=8, storage=f"sqlite:///{tmp_path}/s.db",
                                store_root=tmp_path, progress=False, seed=0), **kw})


class Noisy(FakeTarget):
    """Every measurement anywhere between 0.3x and 1.7x of the landscape's latency, as a whole."""

    def measure(self, schedule, **kw):
        m = super().measure(schedule, **kw)
        if m.ok:
            factor = 0.3 + 1.4 * random.Random(self.calls).random()
            object.__setattr__(m, "samples_ms", tuple(s * factor for s in m.samples_ms))
        return m


class Busy(FakeTarget):
    """Every measurement taken while other processes held 60% of 2 CPUs; candidates win there."""

    def measure(self, schedule, **kw):
        m = super().measure(schedule, **kw)
        if m.ok:
            object.__setattr__(m, "telemetry", {"busy": {"wall_s": 1.0, "others_cpu_s": 1.2, "cpus": 2}})
        return m


def _record(tmp_path, result):
    return json.loads((tmp_path / "schedules" / result.record.hardware.key / f"{W.key}.json").read_text())


def test_an_inconclusive_run_never_replaces_a_conclusive_record(tmp_path):
    def landscape(s):
        return 10.0 if s.is_sequential else 8.0

    [first] = tune(_config(tmp_path), make_target=lambda w: FakeTarget(tiny_context(), landscape), log=lambda *a: None)
    assert first.record.verdict == "winner" and first.kept is None
    stored = _record(tmp_path, first)
    assert stored["verdict"] == "winner" and stored["speedup_interval"][0] > 1 and stored["rounds"] == 5

    flat = Noisy(tiny_context(), lambda s: 10.0 if s.is_sequential else 9.9)
    [second] = tune(_config(tmp_path, trials=10, prune=False), make_target=lambda w: flat, log=lambda *a: None)
    assert second.verdict.kind == "inconclusive"
    assert second.record.verdict == "winner" and "conclusive" in second.kept  # the old record stays
    assert _record(tmp_path, second) == stored


def test_a_busy_machine_stores_no_winner_and_keeps_the_stored_verdict(tmp_path):
    def landscape(s):
        return 10.0 if s.is_sequential else 6.0  # what thread caps do under load

    [first] = tune(_config(tmp_path), make_target=lambda w: FakeTarget(tiny_context(), lambda s: 10.0 if s.is_sequential
                                                                        else 12.0), log=lambda *a: None)
    assert first.record.verdict == "sequential_best"
    stored = _record(tmp_path, first)
    [busy] = tune(_config(tmp_path), make_target=lambda w: Busy(tiny_context(), landscape), log=lambda *a: None)
    assert busy.verdict.kind == "inconclusive" and "the machine was busy" in busy.verdict.reason
    assert busy.record.verdict == "sequential_best" and _record(tmp_path, busy) == stored  # kept
    # accepted on purpose: a winner that says so, and still not in place of the quiet record
    [accepted] = tune(_config(tmp_path, accept_contention=True), make_target=lambda w: Busy(tiny_context(), landscape),
                      log=lambda *a: None)
    assert accepted.verdict.kind == "winner" and accepted.verdict.contended
    assert "measured quiet" in accepted.kept and _record(tmp_path, accepted) == stored


def test_a_contended_record_gives_way_to_a_quiet_one(tmp_path):
    def landscape(s):
        return 10.0 if s.is_sequential else 8.0

    [accepted] = tune(_config(tmp_path, accept_contention=True), make_target=lambda w: Busy(tiny_context(), landscape),
                      log=lambda *a: None)
    assert accepted.kept is None and _record(tmp_path, accepted)["contended"]
    [quiet] = tune(_config(tmp_path), make_target=lambda w: FakeTarget(tiny_context(), landscape), log=lambda *a: None)
    assert quiet.kept is None and quiet.record.verdict == "winner" and _record(tmp_path, quiet)["contended"] is None


def test_an_inconclusive_verdict_is_stored_as_such_when_nothing_was(tmp_path):
    flat = Noisy(tiny_context(), lambda s: 10.0 if s.is_sequential else 9.9)
    [r] = tune(_config(tmp_path, prune=False), make_target=lambda w: flat, log=lambda *a: None)
    assert r.record.verdict == "inconclusive" and r.record.schedule.is_sequential and r.kept is None


def test_nothing_is_concluded_from_nothing(tmp_path):
    """Every candidate incorrect: no candidate to re-measure is inconclusive, never 'sequential
    is best', and a later run's conclusive verdict replaces it."""
    broken = FakeTarget(tiny_context(), lambda s: 10.0, failures={n: TrialOutcome.INCORRECT for n in range(1, 99)},
                        fail_candidates=True)
    [r] = tune(_config(tmp_path), make_target=lambda w: broken, log=lambda *a: None)
    assert r.record.verdict == "inconclusive" and "nothing to compare: no candidate ran correctly (incorrect" \
        in r.verdict.reason
    slow = FakeTarget(tiny_context(), lambda s: 10.0 if s.is_sequential else 12.0)
    [again] = tune(_config(tmp_path, storage=f"sqlite:///{tmp_path}/t.db"), make_target=lambda w: slow,
                   log=lambda *a: None)
    assert again.record.verdict == "sequential_best" and again.kept is None


def test_pruned_trials_are_candidates_by_their_partial_results(tmp_path):
    """Every trial pruned (clearly slower): the best of them are still re-measured in paired
    rounds, and only then is sequential best."""
    slow = FakeTarget(tiny_context(), lambda s: 10.0 if s.is_sequential else 20.0, samples=12)
    [r] = tune(_config(tmp_path, trials=6), make_target=lambda w: slow, log=lambda *a: None)
    assert r.outcomes.get("pruned", 0) >= 5 and r.outcomes.get("ok", 0) <= 1
    assert r.record.verdict == "sequential_best"
    assert any(c.pruned for c in r.verdict.candidates)
    assert all(c.comparison.decision is Decision.EXCLUDED and len(c.comparison.rounds) == 5
               for c in r.verdict.candidates)


def test_a_baseline_that_fails_verification_is_one_line_saying_what_to_do(tmp_path, capsys):
    args = ["tune", "--model", "user_models:noisy_block", "--workload", "d8x1", "--trials", "2", "--no-progress",
            "--storage", f"sqlite:///{tmp_path}/s.db", "--store", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(error_lines(err)) == 1 and "Traceback" not in err
    assert "the sequential baseline failed (incorrect" in err and "--rtol/--atol" in err


def test_a_study_from_before_paired_rounds_is_refused_in_one_line(tmp_path, capsys):
    import optuna

    from dynaflow.tuner.study import study_name

    storage = f"sqlite:///{tmp_path}/old.db"
    name = study_name(tiny_context().hardware.key, W, "dbo")
    old = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    old.add_trial(optuna.trial.create_trial(value=2400.0))  # tokens/s, as older releases stored
    with pytest.raises(Exception, match="made by an older dynaflow-tune: its trial values are tokens/s"):
        tune(_config(tmp_path, storage=storage), make_target=lambda w: FakeTarget(tiny_context(), lambda s: 10.0),
             log=lambda *a: None)


def test_a_measurement_beside_a_failing_baseline_is_a_lost_round():
    from dynaflow.tuner.measuring import measure_pair

    target = FakeTarget(tiny_context(), lambda s: 10.0, failures={1: TrialOutcome.CRASHED})
    m = measure_pair(target, Schedule(split_sizes=(16, 16), label="x"))
    assert m.outcome is TrialOutcome.CRASHED and "the sequential run beside it failed (crashed" in m.message
    m = measure_pair(target, Schedule(split_sizes=(16, 16), label="x"), first="candidate")
    assert m.ok and len(m.baseline_samples_ms) == len(m.samples_ms) and isinstance(m, Measurement)
    with pytest.raises(ValueError, match="first must be 'baseline' or 'candidate'"):
        measure_pair(target, Schedule(), first="both")


def test_ctrl_c_during_the_confirmation_concludes_nothing_and_keeps_the_stored_record(tmp_path, capsys):
    """The first Ctrl-C while the confirmation's rounds run: they stop at the next round, the verdict
    is "inconclusive: interrupted during the confirmation", an earlier winner stays, and the run
    counts as interrupted (`tune` exits 130)."""
    import inspect
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")

    def landscape(s):
        return 10.0 if s.is_sequential else 8.0

    [first] = tune(_config(tmp_path), make_target=lambda w: FakeTarget(tiny_context(), landscape), log=lambda *a: None)
    assert first.record.verdict == "winner"

    class CtrlCInConfirmation(FakeTarget):
        def measure(self, schedule, **kw):
            confirming = any(f.function == "compare" and f.filename.endswith("confirm.py") for f in inspect.stack())
            if confirming and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a flag, handled before the next bytecode
            return super().measure(schedule, **kw)

    target = CtrlCInConfirmation(tiny_context(), landscape)
    target.sent = False
    [second] = tune(_config(tmp_path, trials=10), make_target=lambda w: target, log=lambda *a: None)
    assert target.sent and second.interrupted
    assert second.verdict.kind == "inconclusive" and "interrupted during the confirmation" in second.verdict.reason
    assert sum(len(c.comparison.rounds) for c in second.verdict.candidates) <= 1  # it stopped at the next round
    assert second.record.verdict == "winner" and "conclusive" in second.kept  # the earlier winner stays
    assert "stopping: " in capsys.readouterr().err


# ---- issue 47, point 3: lines that contradicted themselves
def test_too_few_quiet_rounds_are_said_whatever_the_interval():
    """Three quiet rounds of a candidate 5x slower, then no more: its interval lies wholly below 1,
    yet no verdict stands on three rounds, and the reason says so."""
    plan = Plan(candidates=1)
    c = Comparison(rounds=tuple(Round(baseline_ms=10.0, candidate_ms=10.0 / r) for r in (0.2, 0.25, 0.2)))
    v = judge((candidate(c, plan),), plan)
    assert v.kind == "inconclusive"
    assert "trial 1's 3 quiet paired round(s) are fewer than the 5 a verdict needs" in v.reason
    assert "could be 3% faster or not" not in v.reason


def test_a_busy_inconclusive_record_is_not_said_quiet_and_its_few_rounds_are_named():
    from dynaflow.runtime.store import StoredSchedule
    from dynaflow.tuner.show import describe
    from fakes import H100

    rec = StoredSchedule(hardware=H100, workload=W, schedule=Schedule(), verdict="inconclusive", tokens_per_s=1e3,
                         baseline_tokens_per_s=1e3, speedup=1.0, speedup_spread=0.1, efficiency=None, space="nanoflow",
                         speedup_interval=(0.092, 0.332), candidate_speedup=0.2, confidence=0.998, rounds=3,
                         busy_rounds=24, busy={"cpus": 2, "others_cpu_s": 30.0, "wall_s": 31.0, "load1": 3.0})
    shown = describe(rec)
    assert "quiet enough" not in shown
    assert "machine    3 quiet paired round(s) counted, 24 busy one(s) left out" in shown
    assert "interval 0.092-0.332x over 3 paired rounds); 3 quiet paired round(s) counted, fewer than a verdict " \
           "needs" in shown


def test_the_studies_table_counts_the_busy_rounds_beside_a_busy_verdict(tmp_path):
    import optuna

    from dynaflow.tuner import analysis

    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=storage, study_name="hw/w/nanoflow")
    study.set_user_attr("confirmation", {"verdict": "inconclusive", "reason": "the machine was busy", "busy_rounds": 24,
                                         "contended": None})
    row = analysis.studies_table(storage).iloc[0]
    assert row.verdict == "inconclusive" and row.busy_rounds == 24 and not row.accepted_contention
    assert "contended" not in analysis.studies_table(storage).columns


def test_the_progress_bar_best_is_from_quiet_rounds_only():
    from dynaflow.tuner.progress import Progress

    def paired(speedup: float, busy: bool) -> Measurement:
        load = {"cpus": 2, "others_cpu_s": 1.5 if busy else 0.0, "wall_s": 1.0}
        return Measurement(outcome=TrialOutcome.OK, samples_ms=(10.0 / speedup,) * 3, baseline_samples_ms=(10.0,) * 3,
                           telemetry={"busy": load})

    p = Progress(total=3, desc="w", enabled=False)
    p.update(paired(1.1, busy=False))
    p.update(paired(8.7, busy=True))  # a busy round's 8.7x is no evidence: not the best
    assert p.best == pytest.approx(1.1) and p.busy == 1


def test_an_open_verdict_names_the_candidate_that_kept_it_open():
    """The fastest candidate is excluded (its interval lies below 1.03); a slower one's spans it:
    the reason names the open one, not an interval that contradicts 'could be faster'."""
    plan = Plan(candidates=2)
    excluded = comparison([0.86, 0.85, 0.87, 0.86, 0.86], plan)
    spanning = comparison(noisy(0.83, 0.9, seed=3), plan)
    assert excluded.decision is Decision.EXCLUDED and spanning.decision is Decision.UNDECIDED
    v = judge((candidate(excluded, plan, trial=1), candidate(spanning, plan, trial=2)), plan)
    assert v.kind == "inconclusive" and v.reason.startswith("trial 2 (")
    low, high = plan.final(spanning).low, plan.final(spanning).high
    assert low < 1.03 < high
