"""Tune every workload of a TuneConfig in turn; one study and one stored record each."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import optuna

from dynaflow.runtime import MeasureConfig, Workload
from dynaflow.runtime.store import StoredSchedule

from .confirm import confirm, store_verdict
from .config import TuneConfig
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
    if pool is not None:
        return tune_pool(config, make_measurer, pool, log=log)
    results = []
    for workload in config.workloads:
        result = tune_one(workload, make_measurer(workload), config, log=log)
        results.append(result)
        if result.interrupted:
            break
    return results


def tune_one(workload: Workload, measurer: Measurer, config: TuneConfig, *, log=print,
             search=None) -> WorkloadResult:
    """search(study, progress) -> StudyResult; default: measure trials one by one with `measurer`."""
    name = study_name(measurer.hardware.key, workload, config.space)
    study = open_study(name, config)
    baseline = ensure_baseline(study, measurer, config)
    warm = enqueue_warm_starts(study, config, measurer.hardware.key, workload)
    done = len(search_trials(study))
    log(f"study {name}: {done} trial(s) so far, baseline {baseline.tokens_per_s:,.0f} tokens/s"
        + (f", {warm} warm start(s) enqueued" if warm else ""))
    progress = Progress(total=config.trials, desc=workload.key, baseline_tokens_per_s=baseline.tokens_per_s,
                        enabled=config.progress, done=done)
    try:
        result = (search or (lambda s, p: run_search(s, measurer, config, p)))(study, progress)
    finally:
        progress.close()
    try:
        verdict = confirm(study, measurer, config, rounds=1 if result.interrupted else None)
    except KeyboardInterrupt:
        print("interrupted again: nothing stored for this workload", file=sys.stderr)
        raise
    record, path = store_verdict(verdict, study, measurer, workload, config)
    return WorkloadResult(workload=workload, study=name, record=record, path=path,
                          outcomes=result.outcomes, interrupted=result.interrupted)


def tune_pool(config: TuneConfig, make_measurer, pool_config: PoolConfig, *, log=print) -> list[WorkloadResult]:
    """One study per (hardware type, workload); each type's workers search it in parallel.
    Hardware types are tuned one after the other."""
    from .parallel import PoolStats, run_search_pool
    from .pool import ActorMeasurer, RayPool

    pool = RayPool(pool_config, make_measurer)
    results = []
    try:
        log(f"ray pool: {pool.num_workers} worker(s)")
        for workload in config.workloads:
            for group in pool.groups(workload).values():
                stats = PoolStats()
                result = tune_one(workload, ActorMeasurer(pool, group), config, log=log,
                                  search=lambda s, p: run_search_pool(s, group, pool, config, p, stats))
                log(summary_line(group.hardware.key, stats))
                results.append(result)
                if result.interrupted:
                    return results
    finally:
        pool.close()
    return results


def summary_line(hardware_key: str, stats) -> str:
    per = "; ".join(f"{w}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                    for w, c in sorted(stats.per_worker.items()))
    return f"{hardware_key}: {stats.trials} trial(s) by worker: {per or 'none'}"
