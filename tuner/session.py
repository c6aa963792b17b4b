"""One study being tuned, start to finish, whoever measures its trials (this process or a Ray pool):

    start: open the study, measure the baseline, enqueue warm starts, show progress
    finish: confirm the best candidates against the baseline, store the verdict
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import optuna

from dynaflow.runtime import Workload
from dynaflow.runtime.measure import tokens_per_s
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule

from .config import TuneConfig, TuneError
from .confirm import Confirmation, ConfirmConfig, RecordConfig, confirm, store_verdict
from .paired import round_ms
from .pool import PoolLost
from .progress import Progress
from .search import SearchConfig
from .study import (StudyConfig, StudyResult, enqueue_warm_starts, ensure_baseline, make_sampler, open_study,
                    search_trials, study_name, tally)
from .guide import SCREEN_CONFIRM, Guide, make_guide
from .measuring import Target


# Each component's own config, built here from the command's (TuneConfig: the flags, filled once)
def study_config(c: TuneConfig) -> StudyConfig:
    return StudyConfig(storage=c.storage, sampler=c.sampler, seed=c.seed, prune=c.prune)


def search_config(c: TuneConfig) -> SearchConfig:
    return SearchConfig(space=c.space, trials=c.trials, timeout_s=c.timeout_s, trial_timeout_s=c.trial_timeout_s,
                        seed=c.seed, max_duplicates=c.max_duplicates, storage_url=c.storage.url)


def confirm_config(c: TuneConfig) -> ConfirmConfig:
    return ConfirmConfig(top=c.confirm_top, rounds=c.confirm_rounds, min_rounds=c.confirm_min_rounds,
                         min_effect=c.min_effect, accept_contention=c.accept_contention,
                         time_limit_s=c.trial_timeout_s)


def record_config(c: TuneConfig) -> RecordConfig:
    return RecordConfig(store_root=c.store_root, space=c.space, storage_url=c.storage.url)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadResult:
    workload: Workload
    study: str
    record: StoredSchedule
    path: str
    kept: str | None  # why the stored record is an older one, or None
    verdict: Confirmation
    outcomes: dict[str, int]
    distinct: int  # distinct schedules tried in the study, across runs (what the budget counts)
    tally: dict[str, int]  # of them: measured, crashed, interrupted, running (study.tally)
    duplicates: int  # proposals this run answered from the study
    interrupted: bool
    exhausted: bool
    timed_out: bool = False  # --timeout-s ended the search before --trials did


@dataclass(kw_only=True)
class Session:
    workload: Workload
    target: Target
    study: optuna.Study
    progress: Progress
    baseline_trial: int  # this run's baseline: its trials are compared with it
    baseline_ms: float  # its figure (paired.round_ms): the record's sequential figure when no round was measured
    guide: Guide | None = None  # the performance model (tuner/guide.py), None when off or not built for the target
    first_trial: int = 0  # the first trial number of this run: the model's error is over this run's trials
    model_error: object | None = None  # perfmodel.ModelError over this run's trials, once searched
    screened: bool = False  # the model screened the search down to its top few


def start(workload: Workload, target: Target, config: TuneConfig, *, log=print, position: int = 0) -> Session:
    ScheduleStore(StoreConfig(root=config.store_root)).path(target.hardware.key, workload.key)  # inside the store
    name = study_name(target.hardware.key, workload, config.space)
    study = open_study(name, study_config(config))
    baseline, baseline_trial = ensure_baseline(study, target, config.trial_timeout_s, log=log)
    seed = config.seed if config.seed is not None else baseline_trial  # tuners sharing a study differ
    if config.seed is None:
        study.sampler = make_sampler(config.sampler, seed)
    warm = enqueue_warm_starts(study, config.store_root, config.space, target.hardware.key, workload)
    done = len(search_trials(study))
    tokens, figure_ms = target.space_context().layout.num_tokens, round_ms(baseline.samples_ms)
    study.set_user_attr("num_tokens", tokens)
    log(f"study {name}: {done} schedule(s) measured so far, baseline {tokens_per_s(tokens, figure_ms):,.0f} tokens/s "
        f"(trial {baseline_trial}, warm after {study.get_trials(deepcopy=False)[baseline_trial].user_attrs['warm_runs']} "
        f"run(s)), sampler seed {seed}"
        + (f", {warm} warm start(s) enqueued" if warm else ""))
    guide = model_guide(study, target, workload, config, seed=seed, log=log)
    progress = Progress(total=config.trials, desc=f"{target.hardware.key[:24]} {workload.key}" if position else
                        workload.key, enabled=config.progress,
                        done=done, position=position)
    return Session(workload=workload, target=target, study=study, progress=progress, baseline_trial=baseline_trial,
                   baseline_ms=figure_ms, guide=guide, first_trial=baseline_trial + 1)


ENQUEUE_TOP = 3  # the model's best predicted schedules tried first


def model_guide(study: optuna.Study, target: Target, workload: Workload, config: TuneConfig, *, seed: int,
                log=print) -> Guide | None:
    """The performance model for this study, its headroom said before the first trial, and its
    best predicted schedules enqueued; None (and why) where it is off."""
    if not config.model:
        return None
    guide, why = make_guide(target, workload, config.space, StoreConfig(root=config.store_root).profiles_dir,
                            renew=config.renew_profile, seed=seed)
    if guide is None:
        log(why)
        return None
    for line in guide.lines():
        log(line)
    guide.enqueue(study, min(ENQUEUE_TOP, config.trials or ENQUEUE_TOP))
    return guide


def model_summary(session: Session, verdict: Confirmation) -> dict | None:
    """What the model said of this workload, for its record: the headroom, its best prediction, its
    prediction for the best candidate measured, and its error over this run's trials."""
    guide = session.guide
    if guide is None:
        return None
    best = verdict.best_candidate
    predicted = guide.predict(best.schedule) if best is not None and best.schedule is not None else None
    error = session.model_error.to_dict() if session.model_error is not None else None
    return {"sequential_predicted_ms": round(guide.headroom.sequential_ms, 4),
            "bound_speedup": round(guide.headroom.bound_speedup, 4), "busiest": guide.headroom.busiest,
            "best_predicted": round(guide.best[0], 4), "best_predicted_label": guide.best[2].label,
            "candidate_predicted": round(predicted, 4) if predicted is not None else None,
            "screened": session.screened, "error": error}


def finish(session: Session, result: StudyResult, config: TuneConfig, *, stop=()) -> WorkloadResult:
    """Confirm the best candidates against the baseline and store the verdict; once `stop` is
    truthy (Ctrl-C), the confirmation ends at its next round and nothing is concluded."""
    if session.screened:  # the model's top few measured as it predicted: the best of them decides
        config = dataclasses.replace(config, confirm_top=min(config.confirm_top, SCREEN_CONFIRM))
    try:
        verdict = confirm(session.study, session.target, confirm_config(config), interrupted=result.interrupted,
                          stop=stop)
    except KeyboardInterrupt:
        print("interrupted again: nothing stored for this workload", file=sys.stderr)
        raise
    except PoolLost as e:
        raise TuneError(f"{e} during the confirmation. The search is complete in the study "
                        f"({session.study.study_name}); run the same command again to confirm and store the verdict") \
            from None
    record, path, kept, verdict = store_verdict(verdict, session.study, session.target, session.workload,
                                                record_config(config),
                                                warm_baseline_ms=session.baseline_ms, model=model_summary(session, verdict))
    return WorkloadResult(workload=session.workload, study=session.study.study_name, record=record, path=path,
                          kept=kept, verdict=verdict, outcomes=result.outcomes,
                          distinct=len(search_trials(session.study)), tally=tally(session.study),
                          duplicates=result.duplicates,
                          interrupted=result.interrupted or bool(stop), exhausted=result.exhausted,
                          timed_out=result.timed_out)
