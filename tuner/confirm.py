"""No false winners: re-measure the top candidates interleaved with the baseline, then store.

A candidate is stored only if its pooled median beats the baseline's by more than the noise
(the larger relative p10-p90 spread of the two). Otherwise the record says sequential is best
for this hardware and workload, which is a valid answer, not a failure.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from dynaflow.runtime import Schedule, Workload
from dynaflow.runtime.measure import relative_spread
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule

from .config import TuneConfig
from .measurer import Measurer
from .study import BASELINE, result_of


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    trial: optuna.trial.FrozenTrial | None
    schedule: Schedule
    median_ms: float
    baseline_ms: float
    speedup: float
    noise: float
    bound_ms: float | None

    @property
    def wins(self) -> bool:
        return self.trial is not None and self.speedup > 1 + self.noise


def top_candidates(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best distinct schedules among completed search trials."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get(BASELINE) and t.value is not None]
    best, seen = [], set()
    for t in sorted(done, key=lambda t: -t.value):
        key = result_of(t)["schedule"]
        if key not in seen and not Schedule.from_json(key).is_sequential:
            seen.add(key)
            best.append(t)
    return best[:k]


def confirm(study: optuna.Study, measurer: Measurer, config: TuneConfig, *, rounds: int | None = None) -> Verdict:
    candidates = top_candidates(study, config.confirm_top)
    schedules = [Schedule()] + [Schedule.from_json(result_of(t)["schedule"]) for t in candidates]
    pooled: list[list[float]] = [[] for _ in schedules]
    bound = None
    for _ in range(rounds or config.confirm_rounds):
        for i, s in enumerate(schedules):
            m = measurer.measure(s, time_limit_s=config.trial_timeout_s)
            if m.ok:
                pooled[i].extend(m.samples_ms)
                bound = m.bound_ms
    verdicts = [_verdict(t, s, pooled[i + 1], pooled[0], bound)
                for i, (t, s) in enumerate(zip(candidates, schedules[1:])) if pooled[i + 1]]
    winners = sorted((v for v in verdicts if v.wins), key=lambda v: -v.speedup)
    if winners:
        return winners[0]
    base = statistics.median(pooled[0])
    noise = max((v.noise for v in verdicts), default=relative_spread(pooled[0]))
    best = max(verdicts, key=lambda v: v.speedup, default=None)
    return Verdict(trial=None, schedule=Schedule(), median_ms=base, baseline_ms=base,
                   speedup=best.speedup if best else 1.0, noise=noise, bound_ms=bound)


def _verdict(trial, schedule: Schedule, samples: list[float], base: list[float], bound) -> Verdict:
    median, base_median = statistics.median(samples), statistics.median(base)
    return Verdict(trial=trial, schedule=schedule, median_ms=median, baseline_ms=base_median,
                   speedup=base_median / median, noise=max(relative_spread(samples), relative_spread(base)), bound_ms=bound)


def store_verdict(verdict: Verdict, study: optuna.Study, measurer: Measurer, workload: Workload,
                  config: TuneConfig) -> tuple[StoredSchedule, str]:
    tokens = workload.num_tokens if workload.num_tokens else measurer.space_context().layout.num_tokens
    record = StoredSchedule(
        hardware=measurer.hardware, workload=workload, schedule=verdict.schedule,
        sequential_best=not verdict.wins, tokens_per_s=tokens / verdict.median_ms * 1e3,
        baseline_tokens_per_s=tokens / verdict.baseline_ms * 1e3,
        speedup=verdict.speedup if verdict.wins else 1.0, speedup_spread=verdict.noise,
        efficiency=verdict.bound_ms / verdict.median_ms if verdict.bound_ms else None,
        space=config.space, params=dict(verdict.trial.params) if verdict.wins else {},
        study=study.study_name, storage=config.storage,
        trial=verdict.trial.number if verdict.wins else None,
    )
    study.set_user_attr("confirmation", {"winner_trial": record.trial, "speedup": verdict.speedup,
                                         "noise": verdict.noise, "sequential_best": record.sequential_best})
    store = ScheduleStore(StoreConfig(root=config.store_root))
    kept = better_stored(store, record)
    if kept is not None:
        return kept, str(store.path(kept.hardware.key, kept.workload.key))
    return record, str(store.save(record))


def better_stored(store: ScheduleStore, record: StoredSchedule) -> StoredSchedule | None:
    """A record another search space stored for the same key with a larger speedup: tuning one
    space must not overwrite another's winner. A re-tune of the same space always replaces."""
    path = store.path(record.hardware.key, record.workload.key)
    if not path.exists():
        return None
    try:
        old = store.read(path)
    except ValueError:
        return None  # an unreadable record is replaced
    return old if old.space != record.space and old.speedup > record.speedup else None
