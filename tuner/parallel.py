"""The search loop over a pool of workers: one trial in flight per worker, ask/tell in the driver.

    while budget: give every idle worker a trial (ask -> schedule -> measure.remote)
                  wait for one result -> tell; a dead worker's trial is CRASHED, a worker past
                  the time limit is killed and its trial is TIMEOUT; either way a fresh worker
                  takes its place, and the schedule that killed it is never dispatched again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import optuna

from dynaflow.runtime import Measurement, Schedule, TrialOutcome
from dynaflow.search_spaces import get_space

from .config import TuneConfig
from .pool import Group, RayPool
from .progress import Progress
from .study import StudyResult, finish_trial, result_of, search_trials, seen_result


@dataclass(kw_only=True)
class _InFlight:
    trial: optuna.Trial
    schedule: Schedule
    actor: object
    started: float


@dataclass(kw_only=True)
class PoolStats:
    per_worker: dict[str, dict[str, int]] = field(default_factory=dict)
    driver_s: float = 0.0  # time the driver spent outside waiting: ask, build, tell, dispatch
    trials: int = 0

    def count(self, worker: str, outcome: str) -> None:
        counts = self.per_worker.setdefault(worker, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        self.trials += 1


def run_search_pool(study: optuna.Study, group: Group, pool: RayPool, config: TuneConfig,
                    progress: Progress, stats: PoolStats) -> StudyResult:
    space, ctx = get_space(config.space), group.context
    seen, poison = _known(study)
    deadline = time.monotonic() + config.timeout_s if config.timeout_s else float("inf")
    result, inflight, workers = StudyResult(study=study), {}, _Workers(pool, group)
    asked = len(search_trials(study))
    try:
        while True:
            t0 = time.perf_counter()
            while workers.idle and time.monotonic() < deadline and (config.trials is None or asked < config.trials):
                actor, asked = workers.idle.pop(), asked + 1
                if not _dispatch(study, space, ctx, actor, config, seen, poison, inflight, result, progress, stats):
                    workers.idle.append(actor)  # answered without a worker: it takes the next trial
            stats.driver_s += time.perf_counter() - t0
            if not inflight and not workers.starting:
                return result
            ready, _ = pool.ray.wait([*inflight, *workers.starting], num_returns=1, timeout=0.1)
            t0 = time.perf_counter()
            for ref in ready:
                if ref in workers.starting:
                    workers.started(ref)
                else:
                    _collect(study, inflight.pop(ref), ref, workers, poison, seen, result, progress, stats)
            _expire(study, inflight, config, workers, poison, seen, result, progress, stats)
            stats.driver_s += time.perf_counter() - t0
    except KeyboardInterrupt:
        for job in inflight.values():
            finish_trial(study, job.trial, job.schedule,
                         Measurement(outcome=TrialOutcome.INTERRUPTED, message="stopped by the user (Ctrl-C)"))
        result.interrupted = True
        return result


class _Workers:
    """Idle actors, and fresh ones still preparing (the driver never blocks on a replacement)."""

    def __init__(self, pool: RayPool, group: Group) -> None:
        self.pool, self.group = pool, group
        self.idle = list(group.actors)
        self.starting: dict = {}

    def replace(self, dead) -> None:
        fresh, ref = self.pool.start_replacement(self.group, dead)
        self.starting[ref] = fresh

    def started(self, ref) -> None:
        self.pool.check_replacement(self.group, ref)
        self.idle.append(self.starting.pop(ref))


def _collect(study, job: _InFlight, ref, workers: _Workers, poison, seen, result, progress, stats) -> None:
    from ray.exceptions import RayActorError, RayError

    name = workers.pool.name(job.actor)
    try:
        m = workers.pool.ray.get(ref)
        workers.idle.append(job.actor)
    except RayActorError as e:
        m = Measurement(outcome=TrialOutcome.CRASHED, message=f"worker died: {type(e).__name__}")
        poison.add(job.schedule.to_json())
        workers.replace(job.actor)
    except RayError as e:  # the task failed but its worker lives
        m = Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        workers.idle.append(job.actor)
    _record(study, job, m, name, seen, result, progress, stats)


def _expire(study, inflight: dict, config, workers: _Workers, poison, seen, result, progress, stats) -> None:
    """Trials past their limit (and still without a result) are TIMEOUT; their workers are replaced."""
    limit = config.trial_timeout_s and config.trial_timeout_s + workers.pool.config.grace_s
    if not limit:
        return
    late = [ref for ref, job in inflight.items() if time.monotonic() - job.started > limit]
    arrived, _ = workers.pool.ray.wait(late, num_returns=len(late), timeout=0) if late else ([], [])
    for ref in late:
        if ref in arrived:
            continue  # collected on the next pass
        job = inflight.pop(ref)
        name = workers.pool.name(job.actor)
        poison.add(job.schedule.to_json())
        workers.replace(job.actor)
        m = Measurement(outcome=TrialOutcome.TIMEOUT, message=f"no result within {limit:g} s; worker replaced")
        _record(study, job, m, name, seen, result, progress, stats)


def _dispatch(study, space, ctx, actor, config, seen, poison, inflight, result, progress, stats) -> bool:
    """Ask a trial and send it to `actor`; False when it was answered without a worker."""
    trial = study.ask()
    try:
        schedule = space(trial, ctx)
    except Exception as e:  # a bug in a space costs one trial
        schedule = Schedule()
        m = Measurement(outcome=TrialOutcome.CRASHED, message=f"search space raised {type(e).__name__}: {e}")
    else:
        key = schedule.to_json()
        m = Measurement(outcome=TrialOutcome.CRASHED, message="this schedule killed a worker before; not re-run") \
            if key in poison else seen_result(seen, key)
    if m is None:
        ref = actor.measure.remote(schedule, config.trial_timeout_s)
        inflight[ref] = _InFlight(trial=trial, schedule=schedule, actor=actor, started=time.monotonic())
        return True
    finish_trial(study, trial, schedule, m, worker="driver")
    result.outcomes[m.outcome.value] = result.outcomes.get(m.outcome.value, 0) + 1
    stats.count("driver", m.outcome.value)
    progress.update(study, m)
    return False


def _record(study, job: _InFlight, m: Measurement, worker: str, seen, result, progress, stats) -> None:
    finish_trial(study, job.trial, job.schedule, m, worker=worker)
    if m.ok:
        seen[job.schedule.to_json()] = m.tokens_per_s
    result.outcomes[m.outcome.value] = result.outcomes.get(m.outcome.value, 0) + 1
    stats.count(worker, m.outcome.value)
    progress.update(study, m, stats.per_worker)


def _known(study: optuna.Study) -> tuple[dict[str, float], set[str]]:
    """Values of schedules measured before, and schedules that killed a worker, from the study."""
    seen, poison = {}, set()
    for t in study.get_trials(deepcopy=False):
        r = result_of(t)
        if t.state == optuna.trial.TrialState.COMPLETE:
            seen[r.get("schedule")] = t.value
        elif r.get("outcome") in ("crashed", "timeout") and "worker" in r.get("message", ""):
            poison.add(r.get("schedule"))
    return seen, poison
