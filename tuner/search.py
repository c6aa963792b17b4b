"""The tuning loop: the one driver of trials, wherever they run (tuner/pool.py).

    while budget and not Ctrl-C:
        for each lane (a study and its pool), while its pool has room:
            ask -> build the schedule -> known already? answer it here : submit it
        for each lane: wait for finished trials -> tell the study, count, show progress

A lane is one study searched by one pool: this process (`InlinePool`), or the Ray workers of
one hardware type; several lanes (hardware types) search at once in the same loop, which is
the only writer of their studies. The budget counts distinct schedules, across every process
sharing a study. A schedule measured before is answered from the study, not re-timed, and
does not count; a long run of them means the search has converged on what it knows
(`exhausted`). A schedule whose trial killed or hung a worker is never submitted again.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import optuna

from dynaflow.runtime import Measurement, Schedule, TrialOutcome
from dynaflow.search_spaces import SpaceContext, get_space

from .config import TuneError
from .guide import PREDICTED
from .pool import Done, Job, Pool, PoolLost
from .records import StudyOutcome, TrialMeasurement, duplicate
from .progress import Progress
from .storage import Heartbeat, fail_stale_trials
from .study import (SCHEDULE_KEY, Known, StudyResult, finish_trial, interrupted, over_budget, record_trial,
                    search_trials, skipped)

POLL_S = 0.1  # how long one pass of the loop waits for a finished trial, split over the lanes


@dataclass(kw_only=True)
class Lane:
    """One study and the pool its trials run on."""

    study: optuna.Study
    pool: Pool
    context: SpaceContext
    progress: Progress
    baseline_trial: int | None = None  # the run's baseline, which its trials' records name
    guide: object | None = None  # tuner/guide.Guide: each proposal's predicted speedup is kept with its trial


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchConfig:
    """What one search may spend and how it proposes: the space, its budget (distinct schedules,
    wall time, a trial's time limit, known proposals in a row before it has converged), the seed
    of its random draws, and the storage's address for what it says when the storage fails."""

    space: str
    trials: int | None
    timeout_s: float | None
    trial_timeout_s: float | None
    seed: int | None
    max_duplicates: int
    storage_url: str


def run_search(lanes: Sequence[Lane], config: SearchConfig, stop=()) -> list[StudyResult]:
    """Search every lane until each has spent its budget and has nothing in flight, or `stop`
    (a flag the Ctrl-C handler raises; checked between proposals and while timing)."""
    searches = [_Search(lane, config, stop) for lane in lanes]
    wait_s = POLL_S / max(len(searches), 1)
    lost = None
    try:
        while not stop:
            for s in searches:
                s.fill()
            busy = [s for s in searches if s.inflight or s.needs_room()]
            if not busy:
                break
            for s in busy:
                for done in s.lane.pool.wait(wait_s):
                    s.finish(done)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: what is in flight is recorded as interrupted below
    except PoolLost as e:  # the pool is gone (a Ray cluster whose head was lost): in flight is interrupted below
        lost = e
    finally:
        for s in searches:
            s.heartbeat.close()
    for s in searches:
        if stop or s.inflight:
            s.interrupt()
        s.result.timed_out = s.budget.out_of_time() and s.budget.left_by_count(s.study)
    if lost is not None:  # say what the study keeps
        kept = "; ".join(f"{s.study.study_name}: {len(search_trials(s.study))} schedule(s) measured" for s in searches)
        raise TuneError(f"{lost}. The study keeps every trial measured ({kept}); run the same command again to resume "
                        "the search (and then confirm and store the verdict)")
    return [s.result for s in searches]


class _Search:
    """The loop's state for one lane."""

    def __init__(self, lane: Lane, config: SearchConfig, stop) -> None:
        self.lane, self.config, self.stop, self.study = lane, config, stop, lane.study
        self.space, self.known, self.budget = get_space(config.space), Known(lane.study), Budget(config)
        self.heartbeat = Heartbeat(lane.study)
        self.result = StudyResult(study=lane.study)
        self.inflight: dict[int, Proposal] = {}

    def fill(self) -> None:
        """Propose trials while the pool has room and the budget lasts; answer known ones here."""
        t0 = time.perf_counter()
        while self.lane.pool.free() > 0 and self.budget.left(self.study) and not self.stop:
            t1 = time.perf_counter()
            p = propose(self.study, self.space, self.lane.context, self.known, self.config, self.heartbeat,
                        explore=self.budget.stuck)
            self.result.stats.study_s += time.perf_counter() - t1
            if self.lane.guide is not None and (predicted := self.lane.guide.predict(p.schedule)) is not None:
                p.trial.set_user_attr(PREDICTED, round(predicted, 5))
            if p.answer is not None:
                self._record(p, p.answer, None)
                continue
            self.inflight[p.trial.number] = p
            self.lane.pool.submit(Job(id=p.trial.number, schedule=p.schedule, time_limit_s=self.config.trial_timeout_s,
                                      on_sample=self._on_sample(p.trial), paired=True))
        self.result.stats.driver_s += time.perf_counter() - t0

    def needs_room(self) -> bool:
        """Budget left but no room: the pool is replacing workers, so waiting on it makes room."""
        return self.lane.pool.free() == 0 and self.budget.left(self.study) and not self.stop

    def finish(self, done: Done) -> None:
        t0 = time.perf_counter()
        p = self.inflight.pop(done.job.id)
        m = interrupted() if self.stop and not done.measurement.ok else done.measurement
        self._record(p, m, done.worker)
        self.result.stats.driver_s += time.perf_counter() - t0

    def interrupt(self) -> None:
        for p in self.inflight.values():
            finish_trial(self.study, p.trial, p.schedule, interrupted(), baseline=self.lane.baseline_trial)
            self.result.outcomes["interrupted"] = self.result.outcomes.get("interrupted", 0) + 1
        self.inflight.clear()
        self.result.interrupted = True

    def _on_sample(self, trial: optuna.Trial):
        prune = pruning_hook(trial)
        return lambda samples_ms, baseline_ms: bool(self.stop) or prune(samples_ms, baseline_ms)

    def _record(self, p: Proposal, m: Measurement, worker: str | None) -> None:
        t0 = time.perf_counter()
        try:
            record_trial(self.study, p.trial, p.schedule, m, known=self.known, result=self.result, worker=worker,
                         baseline=self.lane.baseline_trial)
        except Exception as e:  # the storage failed (a full disk, a lost database): the study cannot go on
            raise storage_failed(self.study, p.trial, e, self.config.storage_url) from None
        self.heartbeat.discard(p.trial)
        self.result.stats.study_s += time.perf_counter() - t0
        self.result.stats.count(worker, m.outcome.value)
        self.lane.progress.update(m, counted=Budget.counts(m), workers=self.result.stats.per_worker or None)
        self.result.exhausted = self.budget.converged(m)


def storage_failed(study: optuna.Study, trial: optuna.Trial, e: Exception, storage_url: str) -> TuneError:
    """One line for a storage that failed to record a trial; the trial is failed if the storage
    still takes that much (else the next run fails it: its heartbeat has stopped)."""
    try:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        state = "is failed"
    except Exception:  # noqa: BLE001 - the storage is gone: say what happens instead
        state = "will be failed by the next run (its heartbeat stops)"
    first = (str(getattr(e, "orig", None) or e).splitlines() or [""])[0]
    return TuneError(f"the study storage {storage_url} failed to record trial {trial.number} "
                     f"({type(e).__name__}: {first[:200]}); trial {trial.number} {state}, the trials recorded before "
                     "it are kept; free space (or fix the database) and run tune again to resume")


@dataclass(kw_only=True)
class Proposal:
    trial: optuna.Trial
    schedule: Schedule
    answer: Measurement | None = None  # known without timing: a duplicate, skipped, a space error


def propose(study: optuna.Study, space, ctx, known: Known, config: SearchConfig, heartbeat: Heartbeat, *,
            explore: bool = False) -> Proposal:
    """Ask for a trial and build its schedule; answer it at once when no timing is needed.
    `explore`: the sampler keeps proposing known schedules, so this one is drawn at random."""
    fail_stale_trials(study)
    sampler = study.sampler
    if explore:
        study.sampler = optuna.samplers.RandomSampler(seed=None if config.seed is None else config.seed + len(
            study.get_trials(deepcopy=False)))
    try:
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": ours beats
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        heartbeat.add(trial)
        try:  # the space suggests through the sampler chosen above
            schedule = space(trial, ctx)
        except Exception as e:  # a bug in a space costs one trial
            return Proposal(trial=trial, schedule=Schedule(), answer=Measurement(
                outcome=TrialOutcome.CRASHED, message=f"search space raised {type(e).__name__}: {e}"))
    finally:
        study.sampler = sampler
    trial.set_user_attr(SCHEDULE_KEY, schedule.key())  # other processes see it is being measured
    known.refresh(study, me=trial.number)
    if (m := known.reuse(schedule)) is not None:
        return Proposal(trial=trial, schedule=schedule, answer=m)
    if schedule.key() in known.poison:
        return Proposal(trial=trial, schedule=schedule, answer=TrialMeasurement(
            outcome=TrialOutcome.CRASHED, message="this schedule killed a worker before; not re-run",
            killed_worker=True))
    if over_budget(study, trial, config.trials):
        return Proposal(trial=trial, schedule=schedule, answer=skipped())
    return Proposal(trial=trial, schedule=schedule)


class Budget:
    """What is left of the run: distinct schedules (in the study, any process), wall time, and
    how many proposals in a row were schedules already known."""

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        self.deadline = time.monotonic() + config.timeout_s if config.timeout_s else float("inf")
        self.repeats = 0

    @property
    def stuck(self) -> bool:
        """The sampler proposed known schedules twice in a row: draw the next one at random."""
        return self.repeats >= 2

    def left(self, study: optuna.Study) -> bool:
        return not self.out_of_time() and self.left_by_count(study) and self.repeats < self.config.max_duplicates

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def left_by_count(self, study: optuna.Study) -> bool:
        trials = self.config.trials
        return trials is None or len(search_trials(study)) < trials

    @staticmethod
    def counts(m: Measurement) -> bool:
        return not duplicate(m) and m.outcome is not StudyOutcome.SKIPPED

    def converged(self, m: Measurement) -> bool:
        self.repeats = self.repeats + 1 if duplicate(m) else 0
        return self.repeats >= self.config.max_duplicates


def pruning_hook(trial: optuna.Trial):
    """Each sample reported as its speedup over the baseline measured right before it (the trial's
    own round), so the pruner compares trials on one scale whatever the machine did between them.
    A pruned trial stays a candidate for the confirmation, by its partial result."""
    def on_sample(samples_ms: list[float], baseline_ms: float) -> bool:
        trial.report(baseline_ms / samples_ms[-1], step=len(samples_ms) - 1)
        return trial.should_prune()

    return on_sample
