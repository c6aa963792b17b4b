"""Tune every workload of a TuneConfig in turn; one study and one stored record each."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import optuna

from dynaflow.runtime import MeasureConfig, Workload
from dynaflow.runtime.store import StoredSchedule

from .confirm import confirm, store_verdict
from .config import TuneConfig
from .measurer import BenchMeasurer, Measurer
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


def tune(config: TuneConfig, *, make_measurer=None, log=print) -> list[WorkloadResult]:
    """make_measurer(workload) -> Measurer; default: measure in this process on the workload's device."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    measure_config = MeasureConfig(warmup=config.warmup, repeats=config.repeats,
                                   peaks_dir=config.store_root / "peaks")
    make_measurer = make_measurer or (lambda w: BenchMeasurer(w, measure_config))
    results = []
    for workload in config.workloads:
        result = tune_one(workload, make_measurer(workload), config, log=log)
        results.append(result)
        if result.interrupted:
            break
    return results


def tune_one(workload: Workload, measurer: Measurer, config: TuneConfig, *, log=print) -> WorkloadResult:
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
        result = run_search(study, measurer, config, progress)
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
