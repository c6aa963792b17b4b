"""A study per (hardware, workload, space), and what its trials hold.

Each trial keeps its whole record in one user attr (`result`: each attr is a storage write).
The budget counts distinct schedules: a trial whose parameters give a schedule measured
before reuses that result and is marked `duplicate`; a trial asked after other processes
sharing the study spent the budget is `skipped`. Neither counts.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from dynaflow.runtime import Measurement, Schedule, TrialOutcome, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.runtime.workload import model_name

from .config import TuneError
from .paired import round_ms
from .records import StudyOutcome, TrialMeasurement, TrialRecord, duplicate, killed_worker
from .storage import StorageConfig, fail_stale_trials, open_storage
from .measuring import Target, paired_speedup

BASELINE = "baseline"
RESULT = "result"
OBJECTIVE = "paired_speedup"  # a trial's value: its speedup over the sequential run measured right before it
SCHEDULE_KEY = "schedule_key"  # a running trial's schedule, written as soon as it is built
STALE = "the tuning process stopped sending heartbeats during this trial (killed or crashed)"
ASKED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
REUSABLE = {TrialOutcome.OK.value, TrialOutcome.PRUNED.value, TrialOutcome.INCORRECT.value, TrialOutcome.INVALID.value}


def result_of(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    """The trial's record (an empty one, outcome None, while it runs). A trial failed by Optuna's
    stale-trial check has none: its process died while it ran."""
    record = trial.user_attrs.get(RESULT)
    if record is None and trial.state == TrialState.FAIL:
        return TrialRecord(outcome=TrialOutcome.CRASHED.value, message=STALE)
    return TrialRecord.from_json(record)


@dataclass(kw_only=True)
class LoopStats:
    """Who measured a run's trials, and what the driver spent outside waiting for them."""

    per_worker: dict[str, dict[str, int]] = field(default_factory=dict)  # named workers: outcome -> count
    trials: int = 0  # every trial told, measured or answered by the driver
    driver_s: float = 0.0  # ask, build, tell, dispatch and collect
    study_s: float = 0.0  # the part of it spent in Optuna and its storage: ask, suggest, tell

    def count(self, worker: str | None, outcome: str) -> None:
        self.trials += 1
        if worker is not None:
            counts = self.per_worker.setdefault(worker, {})
            counts[outcome] = counts.get(outcome, 0) + 1

    def summary(self, hardware_key: str) -> str:
        per = "; ".join(f"{w}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                        for w, c in sorted(self.per_worker.items()))
        answered = self.trials - sum(sum(c.values()) for c in self.per_worker.values())
        return (f"{hardware_key}: {self.trials} trial(s) by worker: {per or 'none'}"
                + (f"; {answered} answered by the driver (duplicates, skipped)" if answered else "")
                + (f"; driver {1000 * self.driver_s / self.trials:.0f} ms per trial" if self.trials else ""))


@dataclass(kw_only=True)
class StudyResult:
    study: optuna.Study
    interrupted: bool = False
    exhausted: bool = False  # the space kept proposing schedules already measured
    timed_out: bool = False  # --timeout-s ended the search before --trials did
    outcomes: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    stats: LoopStats = field(default_factory=LoopStats)


def study_name(hardware_key: str, workload: Workload, space: str) -> str:
    return f"{hardware_key}/{workload.key}/{space}"


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[name]()


@dataclass(frozen=True, kw_only=True, slots=True)
class StudyConfig:
    """How a workload's study is opened: where, its sampler and seed, whether it prunes (defaults:
    TuneConfig's, the one place they are set; session.py builds each component's config from it)."""

    storage: StorageConfig
    sampler: str
    seed: int | None
    prune: bool


def open_study(name: str, config: StudyConfig) -> optuna.Study:
    sampler = make_sampler(config.sampler, config.seed)
    with warnings.catch_warnings():  # WilcoxonPruner is marked experimental; it fits repeated timings
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=5) if config.prune \
            else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=open_storage(config.storage), study_name=name, direction="maximize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    objective = study.user_attrs.get("objective")
    if objective is None and study.get_trials(deepcopy=False):
        raise TuneError(f"study {name} in {config.storage.url} was made by an older dynaflow-tune: its trial values "
                        f"are tokens/s, this one's are paired speedups ({OBJECTIVE}), and one study cannot mix "
                        "them; tune into another --storage (or delete that study's database)")
    if objective is None:
        study.set_user_attr("objective", OBJECTIVE)
    fail_stale_trials(study)
    return study


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """A search trial that measured (or tried to measure) a schedule of its own: not the baseline,
    not a duplicate or skipped proposal, not one the user interrupted (its schedule is measured
    again by a resumed run, so Ctrl-C costs no budget)."""
    return is_search_trial(trial) and trial.user_attrs.get(RESULT, {}).get("outcome") != StudyOutcome.INTERRUPTED.value


def is_search_trial(trial: optuna.trial.FrozenTrial) -> bool:
    record = trial.user_attrs.get(RESULT, {})
    return not (trial.user_attrs.get(BASELINE) or record.get("duplicate")
                or record.get("outcome") == StudyOutcome.SKIPPED.value)


def search_trials(study: optuna.Study, before: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """Search trials that count toward the budget (numbered below `before`, if given). Enqueued
    warm starts not yet asked do not count; running ones, in any process, do."""
    return [t for t in study.get_trials(deepcopy=False, states=ASKED)
            if counts_toward_budget(t) and (before is None or t.number < before)]


def tally(study: optuna.Study) -> dict[str, int]:
    """The study's search trials (interrupted ones too, which the budget does not count), by what became of them: measured
    (a result: ok, pruned, incorrect, invalid, oom, timeout), crashed, interrupted, running."""
    out = {"measured": 0, "crashed": 0, "interrupted": 0, "running": 0}
    for t in study.get_trials(deepcopy=False, states=ASKED):
        if not is_search_trial(t):
            continue
        outcome = result_of(t).outcome
        kind = ("running" if t.state == TrialState.RUNNING else outcome if outcome in ("crashed", "interrupted")
                else "measured")
        out[kind] += 1
    return out


def over_budget(study: optuna.Study, trial: optuna.Trial, trials: int | None) -> bool:
    """Whether trials numbered before this one already spend the budget (another process
    sharing the study may have asked them)."""
    return trials is not None and len(search_trials(study, before=trial.number)) >= trials


WARM_RUNS = 6  # the most sequential runs spent warming the baseline
ROWS_MIXED = 1e3  # a baseline error this many times the tolerance is not rounding: rows mixed, or the layout is wrong
STABLE = 0.05  # two medians in a row this close (or within the runs' own spread): warm


def ensure_baseline(study: optuna.Study, target: Target, time_limit_s: float | None, *,
                    log=print) -> tuple[Measurement, int]:
    """The sequential schedule, measured until warm (`warm_baseline`) and kept as a completed
    trial without params: each run adds its own, and the run's trials are compared with it
    (their records name it). Returns the measurement and the baseline trial's number."""
    m, runs, drift = warm_baseline(target, time_limit_s)
    if not m.ok:
        advice = ("that is no rounding error: the model's rows are not independent, or the layout is wrong (is the "
                  "batch on another dim of an input or the output? BatchLayout(input_dims=..., output_dim=...) says "
                  "which); only a model that differs from itself run to run (random noise) needs --rtol/--atol"
                  if m.outcome is TrialOutcome.INCORRECT and (m.error_ratio or 0) > ROWS_MIXED else
                  "the sequential run differs from itself beyond the tolerance: loosen it with --rtol/--atol"
                  if m.outcome is TrialOutcome.INCORRECT else "check the model and the device")
        raise TuneError(f"the sequential baseline failed ({m.outcome.value}: {m.message}); {advice}.")
    if drift is not None:
        log(f"baseline still drifting after {runs} runs (the last two figures differ by {drift:.0%}): the machine "
            "is busy or warming; every trial is paired with a baseline run of its own, and only the confirmation's "
            "paired rounds decide")
    study.add_trial(optuna.trial.create_trial(
        value=1.0, intermediate_values=per_sample(m),
        user_attrs={BASELINE: True, "warm_runs": runs, RESULT: trial_record(Schedule(), m, worker=None)}))
    number = max(t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE))
    return m, number


def warm_baseline(target: Target, time_limit_s: float | None) -> tuple[Measurement, int, float | None]:
    """Measure the sequential schedule until two figures (paired.round_ms) in a row agree within
    STABLE (or their own p10-p90 spread), at most WARM_RUNS times: the first runs in a process pay one-off costs
    (allocations, caches, a cold CPU clock). Returns (the last measurement, runs, the drift
    between the last two when they never agreed, else None)."""
    previous, drift = None, None
    for run in range(1, WARM_RUNS + 1):
        m = target.measure(Schedule(), time_limit_s=time_limit_s)
        if not m.ok:
            return m, run, None
        if previous is not None:
            drift = abs(round_ms(m.samples_ms) / round_ms(previous.samples_ms) - 1)
            if drift <= max(STABLE, m.spread or 0.0):
                return m, run, None
        previous = m
    return m, WARM_RUNS, drift


def enqueue_warm_starts(study: optuna.Study, store_root: Path, space: str, hardware_key: str,
                        workload: Workload) -> int:
    """Winners stored for this model's other workloads on this hardware, same space."""
    store = ScheduleStore(StoreConfig(root=store_root))
    n = 0
    for _, rec in store.records(hardware_key):
        if isinstance(rec, ValueError) or rec.space != space or rec.sequential_best or not rec.params:
            continue
        if model_name(rec.workload.model) == model_name(workload.model) and rec.workload.key != workload.key:
            study.enqueue_trial(rec.params, skip_if_exists=True)
            n += 1
    return n


class Known:
    """Schedules this study measured before, with a result a re-proposal can reuse (OK, pruned,
    incorrect, invalid), schedules that killed a worker (never dispatched again), and schedules
    being measured now, by any process sharing the study (each running trial names its schedule
    in SCHEDULE_KEY as soon as it is built): none is measured twice."""

    def __init__(self, study: optuna.Study) -> None:
        self.results: dict[str, Measurement] = {}
        self.poison: set[str] = set()
        self.running: dict[str, int] = {}  # schedule key -> the running trial measuring it
        self.seen: set[int] = set()  # finished trials already read
        self.refresh(study)

    def refresh(self, study: optuna.Study, *, me: int | None = None) -> None:
        """Read what other processes finished or started since the last call (`me`: the trial
        asking, whose own key does not count)."""
        self.running = {}
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                key = t.user_attrs.get(SCHEDULE_KEY)
                if key and t.number != me:
                    self.running.setdefault(key, t.number)
                continue
            if t.number in self.seen:
                continue
            self.seen.add(t.number)
            r = result_of(t)
            if not r.schedule or r.duplicate:
                continue
            if r.outcome in REUSABLE:
                self.results.setdefault(r.schedule_obj().key(), _reusable(r))
            elif r.killed:
                self.poison.add(r.schedule_obj().key())

    def remember(self, schedule: Schedule, m: Measurement) -> None:
        if m.outcome.value in REUSABLE:
            self.results.setdefault(schedule.key(), m)
        elif killed_worker(m):
            self.poison.add(schedule.key())

    def reuse(self, schedule: Schedule) -> Measurement | None:
        """A schedule measured before (TPE re-proposes): its result again, marked, not re-timed;
        one being measured now: skipped, marked a duplicate (neither counts toward the budget)."""
        m = self.results.get(schedule.key())
        if m is None and schedule.key() in self.running:
            return TrialMeasurement(outcome=StudyOutcome.SKIPPED, duplicate=True,
                               message=f"duplicate schedule: being measured now in trial "
                                       f"{self.running[schedule.key()]} (this or another process)")
        if m is None:
            return None
        return TrialMeasurement(outcome=m.outcome, tokens_per_s=m.tokens_per_s, samples_ms=m.samples_ms,
                                duplicate=True, baseline_samples_ms=m.baseline_samples_ms,
                                message=f"duplicate schedule: {m.outcome.value} result reused")


def _reusable(r: TrialRecord) -> Measurement:
    return Measurement(outcome=TrialOutcome(r.outcome), tokens_per_s=r.tokens_per_s, samples_ms=r.samples_ms,
                       baseline_samples_ms=r.baseline_samples_ms)


def record_trial(study: optuna.Study, trial, schedule: Schedule, m: Measurement, *, known: Known,
                 result: StudyResult, worker: str | None = None, baseline: int | None = None) -> None:
    """Tell the study, remember the schedule's result, count the outcome."""
    finish_trial(study, trial, schedule, m, worker=worker, baseline=baseline)
    if duplicate(m):
        result.duplicates += 1
        return
    known.remember(schedule, m)
    result.outcomes[m.outcome.value] = result.outcomes.get(m.outcome.value, 0) + 1


def finish_trial(study: optuna.Study, trial: optuna.Trial, schedule: Schedule, m: Measurement, *,
                 worker: str | None = None, baseline: int | None = None) -> None:
    trial.set_user_attr(RESULT, trial_record(schedule, m, worker, baseline))
    speedup = paired_speedup(m)
    if m.ok and speedup is not None:
        study.tell(trial, speedup)
    elif m.ok:  # measured without its baseline round (cannot happen in the search loop): not comparable
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, state=TrialState.PRUNED if m.outcome is TrialOutcome.PRUNED else TrialState.FAIL)


def trial_record(schedule: Schedule, m: Measurement, worker: str | None, baseline: int | None = None) -> dict:
    """The JSON the study keeps for a trial (`TrialRecord`); `baseline`: the number of the baseline
    trial this trial is compared with (its run's)."""
    return TrialRecord.of(schedule, m, worker=worker, baseline=baseline, speedup=paired_speedup(m)).to_json()


def per_sample(m: Measurement) -> dict[int, float]:
    """The baseline's samples on the pruner's scale: each as a speedup over the baseline's own figure."""
    figure = round_ms(m.samples_ms)
    return {i: figure / s for i, s in enumerate(m.samples_ms)}


def skipped() -> Measurement:
    return TrialMeasurement(outcome=StudyOutcome.SKIPPED, message="not measured: processes sharing this study "
                                                                  "had spent its budget")


def interrupted() -> Measurement:
    return TrialMeasurement(outcome=StudyOutcome.INTERRUPTED, message="stopped by the user (Ctrl-C)")
