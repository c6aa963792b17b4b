"""Tune every workload of a TuneConfig in turn; one study and one stored record each.

    start (study, baseline, warm starts) -> search -> finish (confirm, store)
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import optuna

from dynaflow.runtime import MeasureConfig, Workload
from dynaflow.runtime.store import StoredSchedule

from .confirm import confirm, store_verdict
from .config import TuneConfig
from .interrupt import stop_on_ctrl_c
from .measurer import BenchMeasurer, Measurer
from .pool import PoolConfig
from .progress import Progress
from .study import enqueue_warm_starts, ensure_baseline, open_study, run_search, search_trials, study_name


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadResult:
    workload: Workload
    study: str
    record: StoredSchedule
    path: str
    outcomes: dict[str, int]
    interrupted: bool


def tune(config: TuneConfig, *, make_measurer=None, pool: PoolConfig | None = None, log=print) -> list[WorkloadResult]:
    """make_measurer(workload) -> Measurer; default: measure on the workload's device. With `pool`,
    measurers live in Ray actors (make_measurer must then be picklable) and trials run in parallel."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    measure_config = MeasureConfig(warmup=config.warmup, repeats=config.repeats,
                                   peaks_dir=config.store_root.absolute() / "peaks")
    make_measurer = make_measurer or functools.partial(BenchMeasurer, config=measure_config)
    with stop_on_ctrl_c() as stop:
        if pool is not None:
            return tune_pool(config, make_measurer, pool, log=log, stop=stop)
        results = []
        for workload in config.workloads:
            result = tune_one(workload, make_measurer(workload), config, log=log, stop=stop)
            results.append(result)
            if result.interrupted:
                break
        return results


@dataclass(kw_only=True)
class Session:
    """One study being tuned: opened, baseline measured, warm starts enqueued, progress shown."""

    workload: Workload
    measurer: Measurer
    study: optuna.Study
    progress: Progress


def start(workload: Workload, measurer: Measurer, config: TuneConfig, *, log=print, position: int = 0) -> Session:
    name = study_name(measurer.hardware.key, workload, config.space)
    study = open_study(name, config)
    baseline = ensure_baseline(study, measurer, config)
    warm = enqueue_warm_starts(study, config, measurer.hardware.key, workload)
    done = len(search_trials(study))
    log(f"study {name}: {done} trial(s) so far, baseline {baseline.tokens_per_s:,.0f} tokens/s"
        + (f", {warm} warm start(s) enqueued" if warm else ""))
    progress = Progress(total=config.trials, desc=f"{measurer.hardware.key[:24]} {workload.key}" if position else
                        workload.key, baseline_tokens_per_s=baseline.tokens_per_s, enabled=config.progress,
                        done=done, position=position)
    return Session(workload=workload, measurer=measurer, study=study, progress=progress)


def finish(session: Session, result, config: TuneConfig) -> WorkloadResult:
    """Confirm the best candidates against the baseline and store the verdict."""
    try:
        verdict = confirm(session.study, session.measurer, config, rounds=1 if result.interrupted else None)
    except KeyboardInterrupt:
        print("interrupted again: nothing stored for this workload", file=sys.stderr)
        raise
    record, path = store_verdict(verdict, session.study, session.measurer, session.workload, config)
    return WorkloadResult(workload=session.workload, study=session.study.study_name, record=record, path=path,
                          outcomes=result.outcomes, interrupted=result.interrupted)


def tune_one(workload: Workload, measurer: Measurer, config: TuneConfig, *, log=print, stop=()) -> WorkloadResult:
    session = start(workload, measurer, config, log=log)
    try:
        result = run_search(session.study, measurer, config, session.progress, stop)
    finally:
        session.progress.close()
    return finish(session, result, config)


def tune_pool(config: TuneConfig, make_measurer, pool_config: PoolConfig, *, log=print,
              stop=()) -> list[WorkloadResult]:
    """One study per (hardware type, workload). All hardware types search at once, each with
    its own workers; the baseline and the confirmation run on each type's first worker."""
    from .parallel import Lane, PoolStats, run_lanes
    from .pool import ActorMeasurer, RayPool

    pool = RayPool(pool_config, make_measurer)
    results = []
    try:
        log(f"ray pool: {pool.num_workers} worker(s)")
        for workload in config.workloads:
            groups = list(pool.groups(workload).values())
            sessions = [start(workload, ActorMeasurer(pool, g), config, log=log, position=i)
                        for i, g in enumerate(groups)]
            lanes = [Lane(s.study, g, pool, config, s.progress, PoolStats()) for s, g in zip(sessions, groups)]
            try:
                outcomes = run_lanes(lanes, pool, stop)
            finally:
                for s in sessions:
                    s.progress.close()
            for session, lane, outcome in zip(sessions, lanes, outcomes):
                log(summary_line(lane.group.hardware.key, lane.stats))
                results.append(finish(session, outcome, config))
            if any(r.interrupted for r in results):
                return results
    finally:
        pool.close()
    return results


def summary_line(hardware_key: str, stats) -> str:
    per = "; ".join(f"{w}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                    for w, c in sorted(stats.per_worker.items()))
    return f"{hardware_key}: {stats.trials} trial(s) by worker: {per or 'none'}"
