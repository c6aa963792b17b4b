"""Tune every workload of a TuneConfig in turn; one study and one stored record each.

    for each workload: start (study, baseline, warm starts) -> search -> finish (confirm, store)

Trials are measured in this process, or on a Ray pool with `pool` (tuner/ray_fanout.py).
"""
from __future__ import annotations

import dataclasses
import functools

import optuna

from dynaflow.runtime.store import StoreConfig

from .config import TuneConfig
from .interrupt import stop_on_ctrl_c
from .search import run_search
from .session import WorkloadResult, finish, start
from .targets import LocalTarget, Target


def tune(config: TuneConfig, *, make_target=None, pool=None, log=print) -> list[WorkloadResult]:
    """make_target(workload) -> Target; default: measure on the workload's device. With `pool`
    (a ray_fanout.PoolConfig), targets live in Ray actors (make_target must then be picklable)
    and trials run in parallel."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    measure = config.measure
    if measure.peaks_dir is None:  # one peaks file per hardware for every command (the store's)
        measure = dataclasses.replace(measure, peaks_dir=StoreConfig(root=config.store_root).peaks_dir)
    make_target = make_target or functools.partial(LocalTarget, config=measure)
    with stop_on_ctrl_c() as stop:
        if pool is not None:
            from .ray_fanout import tune_pool

            return tune_pool(config, make_target, pool, log=log, stop=stop)
        results = []
        for workload in config.workloads:
            results.append(tune_one(workload, make_target(workload), config, log=log, stop=stop))
            if results[-1].interrupted:
                break
        return results


def tune_one(workload, target: Target, config: TuneConfig, *, log=print, stop=()) -> WorkloadResult:
    session = start(workload, target, config, log=log)
    try:
        result = run_search(session.study, target, config, session.progress, stop)
    finally:
        session.progress.close()
    return finish(session, result, config)
