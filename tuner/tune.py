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
import time

import optuna

from dynaflow.runtime import Workload
from dynaflow.runtime.files import check_folder
from dynaflow.runtime.store import StoreConfig

from .config import TuneConfig
from .interrupt import stop_on_ctrl_c
from .pool import InlinePool, Pool
from .guide import MODEL_ERROR, RECHECK_ROUNDS, SCREEN_TOP, run_error
from .search import Lane, run_search
from .study import search_trials
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
                  baseline_trial=s.baseline_trial, guide=s.guide)
             for s, (_, p) in zip(sessions, places)]
    try:
        outcomes = _search(sessions, lanes, config, stop, log)
    finally:
        for s in sessions:
            s.progress.close()
    results = []
    for session, outcome in zip(sessions, outcomes):
        if outcome.stats.per_worker:
            log(outcome.stats.summary(session.target.hardware.key))
        if session.guide is not None:
            session.model_error = error = run_error(session.study, since=session.first_trial)
            log(error.text())
            session.study.set_user_attr(MODEL_ERROR, {**error.to_dict(), "at": time.strftime("%Y-%m-%d %H:%M")})
            session.guide.keep_error(error)
        results.append(finish(session, outcome, config, stop=stop))
    return results


def _search(sessions, lanes, config: TuneConfig, stop, log) -> list:
    """The search: in full, or, where the model says that even optimistically no schedule reaches
    1 + min_effect, only its top few (SCREEN_TOP, then stop) unless what they measure contradicts it."""
    full = search_config(config)
    guide = sessions[0].guide if len(sessions) == 1 else None
    screens = guide is not None and guide.screens(config.min_effect)
    # no error measured yet on this device (the assumed one kept the screen off): the search's first
    # trials are the model's top few anyway, and their error, once measured, may screen the rest
    early = (guide is not None and not screens and guide.profile.error is None
             and (not config.trials or config.trials > SCREEN_TOP))
    if not (screens or early):
        return run_search(lanes, full, stop)
    study = sessions[0].study
    budget = min(len(search_trials(study)) + SCREEN_TOP, config.trials or float("inf"))
    if screens:
        log(f"model: even optimistically ({guide.optimistic():.3f}x, its best prediction plus its error) no schedule "
            f"reaches {1 + config.min_effect:.2f}x: measuring only its top {SCREEN_TOP}, then the confirmation decides "
            f"on the best of them")
    first = run_search(lanes, dataclasses.replace(full, trials=int(budget)), stop)
    if early:
        error = run_error(study, since=sessions[0].first_trial)
        if stop or not guide.measured_error(error) or not guide.screens(config.min_effect):
            return _joined(first, run_search(lanes, full, stop))
        log(f"model: its error on its top {error.n}, measured: {guide.error:.0%} at worst; even optimistically "
            f"({guide.optimistic():.3f}x) no schedule reaches {1 + config.min_effect:.2f}x: the search stops at "
            f"them, and the confirmation decides on the best of them")
    sessions[0].screened = True
    target = sessions[0].target
    why = guide.contradicted(study, sessions[0].first_trial, recheck=lambda s: _more_rounds(target, s, stop))
    if why is None or stop:
        log("model: its top schedules measured as it predicted; the search stops here (--no-model searches anyway)")
        return first
    log(f"model: contradicted, {why}: the full search runs")
    sessions[0].screened = False
    return _joined(first, run_search(lanes, full, stop))


def _joined(first: list, second: list) -> list:
    """The results of a search run in two parts, as one (the second's, with the first's counts added)."""
    for a, b in zip(first, second):
        b.duplicates += a.duplicates
        for k, v in a.outcomes.items():
            b.outcomes[k] = b.outcomes.get(k, 0) + v
    return second


def _more_rounds(target, schedule, stop) -> list[float]:
    """RECHECK_ROUNDS more paired rounds of `schedule`: the speedups of those that are evidence
    (Comparison.evidence: no busy or unsteady round)."""
    from .confirm import paired_round
    from .paired import Comparison

    rounds = []
    for k in range(1, RECHECK_ROUNDS + 1):
        if stop:
            break
        r, _ = paired_round(target, schedule, k)
        if r is not None:
            rounds.append(r)
    return [r.ratio for r in Comparison(rounds=tuple(rounds)).evidence()]
