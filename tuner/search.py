"""The tuning loop for one study, in this process:

    while budget: ask -> build schedule -> (known already? reuse) -> measure (verify, time) -> tell

The budget counts distinct schedules, across every process sharing the study. A schedule
measured before is answered from the study, not re-timed, and does not count; a long run of
them means the search has converged on what it knows (`exhausted`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import optuna

from dynaflow.runtime import Measurement, Schedule, TrialOutcome
from dynaflow.search_spaces import get_space

from .config import TuneConfig
from .progress import Progress
from .storage import Heartbeat, fail_stale_trials
from .study import (Known, StudyResult, finish_trial, interrupted, over_budget, record_trial,
                    search_trials, skipped)
from .targets import Target


def run_search(study: optuna.Study, target: Target, config: TuneConfig, progress: Progress, stop=()) -> StudyResult:
    """`stop`: a flag the Ctrl-C handler raises; checked between samples and between trials."""
    space, ctx, known = get_space(config.space), target.space_context(), Known(study)
    result, heartbeat, run = StudyResult(study=study), Heartbeat(study), Budget(config)
    try:
        while run.left(study) and not stop:
            p = propose(study, space, ctx, known, config, heartbeat, explore=run.stuck)
            try:
                prune = pruning_hook(p.trial, target)
                m = p.answer or target.measure(p.schedule, on_sample=lambda x: bool(stop) or prune(x),
                                               time_limit_s=config.trial_timeout_s)
                m = interrupted() if stop and not m.ok else m
            except KeyboardInterrupt:
                finish_trial(study, p.trial, p.schedule, interrupted())
                result.interrupted = True
                break
            except Exception as e:  # a bug in a target costs one trial, not the study
                m = Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {e}")
            record_trial(study, p.trial, p.schedule, m, known=known, result=result)
            heartbeat.discard(p.trial)
            progress.update(m, counted=run.counts(m))
            result.exhausted = run.converged(m)
    finally:
        heartbeat.close()
    result.interrupted = result.interrupted or bool(stop)
    return result


@dataclass(kw_only=True)
class Proposal:
    trial: optuna.Trial
    schedule: Schedule
    answer: Measurement | None = None  # known without timing: a duplicate, skipped, a space error


def propose(study: optuna.Study, space, ctx, known: Known, config: TuneConfig, heartbeat: Heartbeat, *,
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
    if (m := known.reuse(schedule)) is not None:
        return Proposal(trial=trial, schedule=schedule, answer=m)
    if schedule.key() in known.poison:
        return Proposal(trial=trial, schedule=schedule, answer=Measurement(
            outcome=TrialOutcome.CRASHED, message="this schedule killed a worker before; not re-run",
            killed_worker=True))
    if over_budget(study, trial, config):
        return Proposal(trial=trial, schedule=schedule, answer=skipped())
    return Proposal(trial=trial, schedule=schedule)


class Budget:
    """What is left of the run: distinct schedules (in the study, any process), wall time, and
    how many proposals in a row were schedules already known."""

    def __init__(self, config: TuneConfig) -> None:
        self.config = config
        self.deadline = time.monotonic() + config.timeout_s if config.timeout_s else float("inf")
        self.repeats = 0

    @property
    def stuck(self) -> bool:
        """The sampler proposed known schedules twice in a row: draw the next one at random."""
        return self.repeats >= 2

    def left(self, study: optuna.Study) -> bool:
        trials = self.config.trials
        return time.monotonic() < self.deadline and (trials is None or len(search_trials(study)) < trials) \
            and self.repeats < self.config.max_duplicates

    @staticmethod
    def counts(m: Measurement) -> bool:
        return not m.duplicate and m.outcome is not TrialOutcome.SKIPPED

    def converged(self, m: Measurement) -> bool:
        self.repeats = self.repeats + 1 if m.duplicate else 0
        return self.repeats >= self.config.max_duplicates


def pruning_hook(trial: optuna.Trial, target: Target):
    tokens = target.space_context().layout.num_tokens

    def on_sample(samples_ms: list[float]) -> bool:
        trial.report(tokens / samples_ms[-1] * 1e3, step=len(samples_ms) - 1)
        return trial.should_prune()

    return on_sample
