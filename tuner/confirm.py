"""No false winners: re-measure the top candidates interleaved with the baseline, then store.

Three verdicts, from a 95% bootstrap interval of each candidate's speedup (baseline median over
candidate median, on the pooled samples of every confirmation round):
- `winner`: the best candidate whose interval lies above 1: a speedup beyond the noise;
- `sequential_best`: every candidate's interval ends below 1 + min_effect: none can be faster
  by more than the smallest effect this confirmation is asked to resolve (also when no
  candidate completed);
- `inconclusive`: otherwise: the noise is too large to tell, or the run was interrupted
  before any candidate was measured. The sequential schedule is stored, marked as such, and
  never replaces a conclusive record.

How busy the machine was over the confirmation's runs is kept with the verdict; a verdict
reached while other processes used a large share of the machine says so (`contended`).
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import TrialState

from dynaflow.runtime import Schedule, Workload, telemetry
from dynaflow.runtime.measure import relative_spread, tokens_per_s
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.runtime.store import Verdict as Kind  # the stored verdict; `Verdict` here is the confirmation

from .config import TuneConfig, TuneError
from .study import BASELINE, result_of
from .targets import Target, explain

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    trial: optuna.trial.FrozenTrial
    schedule: Schedule
    samples_ms: tuple[float, ...]
    speedup: float
    low: float  # the speedup's confidence interval
    high: float
    noise: float  # the larger relative p10-p90 spread of candidate and baseline


@dataclass(frozen=True, kw_only=True)
class Verdict:
    kind: Kind
    best: Candidate | None  # the winner, or the fastest candidate when there is none
    baseline_samples_ms: tuple[float, ...]
    bound_ms: float | None
    min_effect: float
    candidates: tuple[Candidate, ...] = field(default=())
    busy: dict = field(default_factory=dict)  # how busy the machine was over the confirmation (telemetry.busy_since)
    interrupted_early: bool = False  # stopped before any candidate was measured

    @property
    def contended(self) -> str | None:
        """Why the confirmation ran under contention, in words; None when it did not."""
        return telemetry.contention(self.busy)

    @property
    def wins(self) -> bool:
        return self.kind is Kind.WINNER

    @property
    def baseline_ms(self) -> float:
        return statistics.median(self.baseline_samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.best.samples_ms) if self.wins else self.baseline_ms

    @property
    def schedule(self) -> Schedule:
        return self.best.schedule if self.wins else Schedule()

    @property
    def noise(self) -> float:
        return self.best.noise if self.best else relative_spread(list(self.baseline_samples_ms))

    def attrs(self) -> dict:
        """What the study keeps of the confirmation: the report and the notebook read it."""
        return {"verdict": self.kind.value, "winner_trial": self.best.trial.number if self.wins else None,
                "speedup": self.best.speedup if self.best else 1.0, "low": self.best.low if self.best else None,
                "high": self.best.high if self.best else None, "noise": self.noise, "min_effect": self.min_effect,
                "sequential_best": not self.wins, "baseline_samples_ms": list(self.baseline_samples_ms),
                "best_samples_ms": list(self.best.samples_ms) if self.best else [],
                "best_trial": self.best.trial.number if self.best else None,
                "busy": self.busy, "contended": self.contended, "interrupted_early": self.interrupted_early}


def top_candidates(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best distinct schedules among completed search trials."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get(BASELINE) and t.value is not None and not result_of(t).get("duplicate")]
    best, seen = [], set()
    for t in sorted(done, key=lambda t: -t.value):
        schedule = Schedule.from_json(result_of(t)["schedule"])
        if schedule.key() not in seen and not schedule.is_sequential:
            seen.add(schedule.key())
            best.append(t)
    return best[:k]


def confirm(study: optuna.Study, target: Target, config: TuneConfig, *, rounds: int | None = None,
            interrupted: bool = False) -> Verdict:
    """`interrupted`: the search was stopped; with no candidate measured, nothing is concluded."""
    trials = top_candidates(study, config.confirm_top)
    schedules = [Schedule()] + [Schedule.from_json(result_of(t)["schedule"]) for t in trials]
    pooled: list[list[float]] = [[] for _ in schedules]
    bound, busy = None, []
    for _ in range(rounds or config.confirm_rounds):
        for i, s in enumerate(schedules):
            m = target.measure(s, time_limit_s=config.trial_timeout_s)
            busy.append(m.telemetry.get("busy") or {})
            if m.ok:
                pooled[i].extend(m.samples_ms)
                bound = m.bound_ms
    if not pooled[0]:
        pooled[0] = list(result_of(_baseline(study)).get("samples_ms") or [float("nan")])
    candidates = tuple(_candidate(t, s, pooled[i + 1], pooled[0])
                       for i, (t, s) in enumerate(zip(trials, schedules[1:])) if pooled[i + 1])
    early = interrupted and not candidates
    verdict = judge(candidates, tuple(pooled[0]), bound, config.min_effect, undecided=early)
    return dataclasses.replace(verdict, busy=telemetry.merge_busy(busy), interrupted_early=early)


def judge(candidates: tuple[Candidate, ...], baseline: tuple[float, ...], bound_ms: float | None,
          min_effect: float, *, undecided: bool = False) -> Verdict:
    """`undecided`: nothing may be concluded (an interrupted run with no candidate): inconclusive."""
    winners = [c for c in candidates if c.low > 1.0]
    if winners:
        kind, best = Kind.WINNER, max(winners, key=lambda c: c.speedup)
    else:
        best = max(candidates, key=lambda c: c.speedup, default=None)
        kind = Kind.SEQUENTIAL_BEST if all(c.high < 1.0 + min_effect for c in candidates) else Kind.INCONCLUSIVE
    if undecided:
        kind = Kind.INCONCLUSIVE
    return Verdict(kind=kind, best=best, baseline_samples_ms=baseline, bound_ms=bound_ms, min_effect=min_effect,
                   candidates=candidates)


def _candidate(trial, schedule: Schedule, samples: list[float], base: list[float]) -> Candidate:
    low, high = speedup_interval(base, samples)
    return Candidate(trial=trial, schedule=schedule, samples_ms=tuple(samples),
                     speedup=statistics.median(base) / statistics.median(samples), low=low, high=high,
                     noise=max(relative_spread(samples), relative_spread(base)))


def speedup_interval(base: list[float], cand: list[float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(base) / median(cand) (scipy, seeded)."""
    from scipy import stats

    if len(base) < 2 or len(cand) < 2:
        ratio = statistics.median(base) / statistics.median(cand)
        return 0.0, float("inf") if ratio > 0 else 0.0  # one sample each: nothing can be concluded

    def ratio(b, c, axis):
        return np.median(b, axis=axis) / np.median(c, axis=axis)

    kwargs = dict(vectorized=True, n_resamples=RESAMPLES, method="percentile", confidence_level=CONFIDENCE)
    data = (np.asarray(base, dtype=float), np.asarray(cand, dtype=float))
    try:
        ci = stats.bootstrap(data, ratio, rng=0, **kwargs).confidence_interval
    except TypeError:  # scipy < 1.15 names the seed random_state
        ci = stats.bootstrap(data, ratio, random_state=0, **kwargs).confidence_interval
    return float(ci.low), float(ci.high)


def _baseline(study: optuna.Study):
    return next(t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE))


def store_verdict(verdict: Verdict, study: optuna.Study, target: Target, workload: Workload,
                  config: TuneConfig) -> tuple[StoredSchedule, str, str | None]:
    """Store the verdict; returns the record in the store, its path, and why an older record was
    kept instead (None when this verdict was stored)."""
    tokens = workload.num_tokens if workload.num_tokens else target.space_context().layout.num_tokens
    best = verdict.best
    record = StoredSchedule(
        hardware=target.hardware, workload=workload, schedule=verdict.schedule, verdict=verdict.kind,
        tokens_per_s=tokens_per_s(tokens, verdict.median_ms),
        baseline_tokens_per_s=tokens_per_s(tokens, verdict.baseline_ms),
        speedup=best.speedup if verdict.wins else 1.0, speedup_spread=verdict.noise,
        speedup_interval=(best.low, best.high) if best else None,
        efficiency=verdict.bound_ms / verdict.median_ms if verdict.bound_ms else None,
        space=config.space, params=dict(best.trial.params) if verdict.wins else {},
        study=study.study_name, storage=config.storage.url, trial=best.trial.number if verdict.wins else None,
        busy=verdict.busy, contended=verdict.contended,
        overlap=explain(target, verdict.schedule) if verdict.wins else None,
    )
    study.set_user_attr("confirmation", verdict.attrs())
    store = ScheduleStore(StoreConfig(root=config.store_root))
    try:
        kept, path, why = store.save_unless_kept(record)
    except OSError as e:  # a full disk, a folder made read-only mid-run: the write left nothing half-done
        where = store.path(record.hardware.key, record.workload.key)
        raise TuneError(f"cannot write the record {where}: {e.strerror or e}; nothing was half-written (any older "
                        f"record there is unchanged) and study {study.study_name} in {config.storage.url} keeps every "
                        "trial and the verdict: free space and run tune again to store it") from None
    return kept, str(path), why


def verdict_text(v: dict | None) -> str:
    """A confirmation (a study's "confirmation" attribute, Verdict.attrs()) in words, with what to
    do when it is inconclusive, and whether it ran under contention."""
    if not v:
        return "not run yet"
    text = _verdict_words(v)
    if v.get("contended"):
        text += f"; measured under contention: {v['contended']}"
    return text


def _verdict_words(v: dict) -> str:
    kind = v.get("verdict") or ("sequential_best" if v.get("sequential_best") else "winner")
    interval = f"95% interval {v['low']:.2f}-{v['high']:.2f}x" if v.get("low") is not None else "no interval"
    if kind == "winner":
        return f"{v['speedup']:.3f}x over sequential, confirmed ({interval}; trial {v['winner_trial']})"
    effect = v.get("min_effect") or 0.03
    if v.get("interrupted_early"):
        return ("inconclusive: interrupted before any candidate was measured; sequential kept, nothing concluded "
                "(run tune again to search)")
    if kind == "sequential_best":
        if v.get("best_trial") is None:
            return "sequential is best: no candidate completed (every trial was pruned or failed)"
        return (f"sequential is best: no candidate can be faster by {effect:.0%} or more "
                f"(best candidate {v['speedup']:.3f}x, {interval})")
    return (f"inconclusive: best candidate {v['speedup']:.3f}x ({interval}, noise {v['noise']:.0%}) could be "
            f"{effect:.0%} faster or not; sequential kept. To decide: more rounds (--confirm-rounds 9), "
            "pinned threads (taskset -c 0-1, OMP_NUM_THREADS), or a quieter machine")
