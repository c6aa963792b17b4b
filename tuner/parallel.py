"""The search loop over a pool of workers: one trial in flight per worker, ask/tell in the driver.

    while budget: give every idle worker a trial (ask -> schedule -> measure.remote)
                  wait for one result -> tell; a dead worker's trial is CRASHED, a worker past
                  the time limit is killed and its trial is TIMEOUT; either way a fresh worker
                  takes its place, and the schedule that killed it is never dispatched again.

Each hardware type is a lane with its own study and workers; all lanes run in the one loop.
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
from .study import StudyResult, finish_trial, known_schedules, record_trial, search_trials, seen_result


@dataclass(kw_only=True)
class PoolStats:
    per_worker: dict[str, dict[str, int]] = field(default_factory=dict)
    driver_s: float = 0.0  # time the driver spent outside waiting: ask, build, tell, dispatch
    study_s: float = 0.0  # the part of it spent in Optuna and its storage: ask, suggest, tell
    trials: int = 0

    def count(self, worker: str, outcome: str) -> None:
        counts = self.per_worker.setdefault(worker, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        self.trials += 1


@dataclass(kw_only=True)
class _InFlight:
    trial: optuna.Trial
    schedule: Schedule
    actor: object
    started: float


class Lane:
    """One study searched by the workers of one hardware type."""

    def __init__(self, study: optuna.Study, group: Group, pool: RayPool, config: TuneConfig,
                 progress: Progress, stats: PoolStats) -> None:
        self.study, self.group, self.pool, self.config = study, group, pool, config
        self.progress, self.stats = progress, stats
        self.space = get_space(config.space)
        self.seen, self.poison = known_schedules(study)
        self.asked = len(search_trials(study))
        self.deadline = time.monotonic() + config.timeout_s if config.timeout_s else float("inf")
        self.result = StudyResult(study=study)
        self.inflight: dict = {}
        self.idle = list(group.actors)
        self.starting: dict = {}  # fresh actors still preparing: the driver never blocks on them

    def refs(self) -> list:
        return [*self.inflight, *self.starting]

    def dispatch(self) -> None:
        """Give every idle worker a trial while the budget lasts."""
        while self.idle and time.monotonic() < self.deadline and \
                (self.config.trials is None or self.asked < self.config.trials):
            actor, self.asked = self.idle.pop(), self.asked + 1
            if not self._send(actor):
                self.idle.append(actor)  # answered without a worker: it takes the next trial

    def _send(self, actor) -> bool:
        t0 = time.perf_counter()
        trial = self.study.ask()
        try:
            schedule = self.space(trial, self.group.context)
        except Exception as e:  # a bug in a space costs one trial
            schedule = Schedule()
            m = Measurement(outcome=TrialOutcome.CRASHED, message=f"search space raised {type(e).__name__}: {e}")
        else:
            key = schedule.to_json()
            m = Measurement(outcome=TrialOutcome.CRASHED, message="this schedule killed a worker before; not re-run") \
                if key in self.poison else seen_result(self.seen, key)
        self.stats.study_s += time.perf_counter() - t0
        if m is None:
            ref = actor.measure.remote(schedule, self.config.trial_timeout_s)
            self.inflight[ref] = _InFlight(trial=trial, schedule=schedule, actor=actor, started=time.monotonic())
            return True
        self._record(trial, schedule, m, "driver")
        return False

    def ready(self, ref) -> None:
        if ref in self.starting:
            self.pool.check_replacement(self.group, ref)
            self.idle.append(self.starting.pop(ref))
            return
        from ray.exceptions import RayActorError, RayError

        job = self.inflight.pop(ref)
        name = self.pool.name(job.actor)
        try:
            m = self.pool.ray.get(ref)
            self.idle.append(job.actor)
        except RayActorError as e:
            m = Measurement(outcome=TrialOutcome.CRASHED, message=f"worker died: {type(e).__name__}")
            self._replace(job)
        except RayError as e:  # the task failed but its worker lives
            m = Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {str(e).splitlines()[0]}")
            self.idle.append(job.actor)
        self._record(job.trial, job.schedule, m, name)

    def expire(self) -> None:
        """Trials past their limit (and still without a result) are TIMEOUT; their workers are replaced."""
        limit = self.config.trial_timeout_s and self.config.trial_timeout_s + self.pool.config.grace_s
        late = [ref for ref, job in self.inflight.items() if limit and time.monotonic() - job.started > limit]
        arrived, _ = self.pool.ray.wait(late, num_returns=len(late), timeout=0) if late else ([], [])
        for ref in late:
            if ref in arrived:
                continue  # collected on the next pass
            job = self.inflight.pop(ref)
            name = self.pool.name(job.actor)
            self._replace(job)
            m = Measurement(outcome=TrialOutcome.TIMEOUT, message=f"no result within {limit:g} s; worker replaced")
            self._record(job.trial, job.schedule, m, name)

    def interrupt(self) -> None:
        for job in self.inflight.values():
            finish_trial(self.study, job.trial, job.schedule,
                         Measurement(outcome=TrialOutcome.INTERRUPTED, message="stopped by the user (Ctrl-C)"))
        self.inflight.clear()
        self.result.interrupted = True

    def _replace(self, job: _InFlight) -> None:
        self.poison.add(job.schedule.to_json())
        fresh, ref = self.pool.start_replacement(self.group, job.actor)
        self.starting[ref] = fresh

    def _record(self, trial, schedule: Schedule, m: Measurement, worker: str) -> None:
        t0 = time.perf_counter()
        record_trial(self.study, trial, schedule, m, seen=self.seen, result=self.result, worker=worker)
        self.stats.study_s += time.perf_counter() - t0
        self.stats.count(worker, m.outcome.value)
        self.progress.update(self.study, m, self.stats.per_worker)


def run_lanes(lanes: list[Lane], pool: RayPool, stop=()) -> list[StudyResult]:
    """Drive every lane until each has spent its budget and has nothing in flight, or `stop`."""
    try:
        while not stop:
            t0 = time.perf_counter()
            for lane in lanes:
                lane.dispatch()
            owner = {ref: lane for lane in lanes for ref in lane.refs()}
            _charge(lanes, time.perf_counter() - t0)
            if not owner:
                return [lane.result for lane in lanes]
            ready, _ = pool.ray.wait(list(owner), num_returns=1, timeout=0.1)
            t0 = time.perf_counter()
            for ref in ready:
                owner[ref].ready(ref)
            for lane in lanes:
                lane.expire()
            _charge(lanes, time.perf_counter() - t0)
    except KeyboardInterrupt:
        pass
    for lane in lanes:
        lane.interrupt()
    return [lane.result for lane in lanes]


def run_search_pool(study: optuna.Study, group: Group, pool: RayPool, config: TuneConfig,
                    progress: Progress, stats: PoolStats, stop=()) -> StudyResult:
    """One study on one group of workers."""
    return run_lanes([Lane(study, group, pool, config, progress, stats)], pool, stop)[0]


def _charge(lanes: list[Lane], seconds: float) -> None:
    for lane in lanes:
        lane.stats.driver_s += seconds / len(lanes)
