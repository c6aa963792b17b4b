"""Tune every workload of a TuneConfig in turn; one study and one stored record each (per
hardware type, when a Ray pool spans several).

    for each workload: start (study, baseline, warm starts) -> search -> finish (confirm, store)

Where trials run is a pool (tuner/pool.py): this process by default, Ray actors with `pool`
(tuner/ray_fanout.py). The search is the one loop in tuner/search.py either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import optuna

from dynaflow.runtime import Workload
from dynaflow.runtime.files import check_folder
from dynaflow.runtime.store import StoreConfig

from .config import TuneConfig
from .interrupt import stop_on_ctrl_c
from .pool import InlinePool, Pool
from .search import Lane, run_search
from .session import WorkloadResult, finish, search_config, start
from .storage import check_storage
from .measuring import Target, close_target
from .targets import integration_of, reserve, target_for


def tune(config: TuneConfig, *, make_target=None, pool=None, log=print) -> list[WorkloadResult]:
    """make_target(workload) -> Target; default: measure on the workload's device. With `pool`
    (a ray_fanout.PoolConfig), targets live in Ray actors (make_target must then be picklable)
    and trials run in parallel."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_folder(config.store_root, "--store")  # before any model is built: a whole search must be storable
    if not config.storage.url.endswith(":memory:"):
        check_storage(config.storage.url)
    measure = config.measure
    if measure.peaks_dir is None:  # one peaks file per hardware for every command (the store's)
        measure = dataclasses.replace(measure, peaks_dir=StoreConfig(root=config.store_root).peaks_dir)
    for w in config.workloads if pool is not None else ():  # bad input: exit 2
        if (integration := integration_of(w)) is not None and integration.no_pool:
            raise ValueError(integration.no_pool)
    if pool is not None and pool.group_size != max(w.tp for w in config.workloads):  # a caller's PoolConfig
        raise ValueError(f"a Ray pool of {pool.group_size}-rank workers cannot run "
                         f"{', '.join(sorted({w.key for w in config.workloads if w.tp != pool.group_size}))}: "
                         f"give the pool group_size={max(w.tp for w in config.workloads)}.")
    if make_target is None:
        reserve(config.workloads)
        make_target = functools.partial(target_for, config=measure)
    with stop_on_ctrl_c() as stop, _places(make_target, pool, log) as place:
        results: list[WorkloadResult] = []
        for workload in config.workloads:
            places = place(workload)
            try:
                results += tune_workload(workload, places, config, log=log, stop=stop)
            finally:
                for target, _ in places:
                    close_target(target)
            if any(r.interrupted for r in results):
                break
        return results



@contextlib.contextmanager
def _places(make_target, pool, log):
    """place(workload) -> [(target, pool)]: this process, or one pair per hardware type in Ray."""
    if pool is None:
        yield lambda workload: [(target := make_target(workload), InlinePool(target))]
        return
    from .ray_fanout import ray_places

    with ray_places(pool, make_target, log=log) as place:
        yield place


def tune_workload(workload: Workload, places: list[tuple[Target, Pool]], config: TuneConfig, *, log=print,
                  stop=()) -> list[WorkloadResult]:
    """One study per (target, pool), searched at once; each confirmed on its target and stored."""
    sessions = [start(workload, target, config, log=log, position=i) for i, (target, _) in enumerate(places)]
    lanes = [Lane(study=s.study, pool=p, context=s.target.space_context(), progress=s.progress,
                  baseline_trial=s.baseline_trial)
             for s, (_, p) in zip(sessions, places)]
    try:
        outcomes = run_search(lanes, search_config(config), stop)
    finally:
        for s in sessions:
            s.progress.close()
    results = []
    for session, outcome in zip(sessions, outcomes):
        if outcome.stats.per_worker:
            log(outcome.stats.summary(session.target.hardware.key))
        results.append(finish(session, outcome, config, stop=stop))
    return results
