"""Trials fanned out over Ray actors: one per GPU (or CPU slot), grouped by hardware type.

    while budget: give every idle worker a trial (propose -> measure.remote)
                  wait for one result -> tell; a dead worker's trial is CRASHED, a worker past
                  the time limit is killed and its trial is TIMEOUT; either way a fresh worker
                  takes its place, and the schedule that killed it is never dispatched again.

Each hardware type is a lane with its own study and workers; all lanes run in the driver's one
loop, and the driver is the only writer of the studies. Ray is imported only here and only
when a pool starts (`--workers`), so the GPU machine and users' servers never need it. Each
actor asks for one GPU and no CPU (an actor holding the only CPU starves everything else); a
worker count the cluster cannot hold is refused at once instead of leaving actors pending.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna

from dynaflow.runtime import Hardware, Measurement, OpGraph, Schedule, TrialOutcome, Workload
from dynaflow.search_spaces import SpaceContext, get_space

from .config import TuneConfig
from .progress import Progress
from .search import Budget, propose
from .session import WorkloadResult, finish, start
from .storage import Heartbeat
from .study import Known, StudyResult, finish_trial, interrupted, record_trial
from .targets import Target

GRACE_S = 5.0  # beyond a trial's own time limit, before the driver gives up on its worker


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolConfig:
    workers: int | str = "all"  # a count, or "all": one per GPU (or CPU slot) in the cluster
    address: str | None = None  # join this Ray cluster; None: RAY_ADDRESS, else start a local one
    use_gpus: bool = False  # one GPU per actor; False: one CPU slot per actor
    prepare_timeout_s: float = 900.0
    grace_s: float = GRACE_S  # beyond a trial's time limit before its worker is declared hung

    def __post_init__(self) -> None:
        if self.workers != "all" and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"--workers must be a positive count or 'all', but got {self.workers!r}.")


# --- the workers ---------------------------------------------------------------------------

class MeasureWorker:
    """The actor's body: builds a target per workload and measures schedules on it."""

    def __init__(self, make_target: Callable[[Workload], Target]) -> None:
        self.make_target = make_target
        self.target: Target | None = None

    def prepare(self, workload: Workload) -> tuple[Hardware, SpaceContext]:
        self.target = self.make_target(workload)
        ctx = self.target.space_context()
        light = OpGraph(ops=ctx.graph.ops, module=None, writes_output=ctx.graph.writes_output)  # no weights
        return self.target.hardware, SpaceContext(hardware=ctx.hardware, graph=light, layout=ctx.layout)

    def measure(self, schedule: Schedule, time_limit_s: float | None) -> Measurement:
        try:
            return self.target.measure(schedule, time_limit_s=time_limit_s)
        except Exception as e:  # raised, not died: the worker lives on
            return Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {e}")


@dataclass(kw_only=True)
class Group:
    """The actors of one hardware type, ready for one workload."""

    hardware: Hardware
    context: SpaceContext
    actors: list[Any] = field(default_factory=list)


class RayPool:
    def __init__(self, config: PoolConfig, make_target: Callable[[Workload], Target]) -> None:
        import ray

        self.ray, self.config, self.make_target = ray, config, make_target
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            address = config.address or os.environ.get("RAY_ADDRESS")
            if address:  # a cluster's own runtime_env decides what its workers can import
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:  # local workers import what the driver can (e.g. --model mymodule:make_case)
                path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
                ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        self.num_workers = self._check_capacity()
        options = {"num_gpus": 1, "num_cpus": 0} if config.use_gpus else {"num_cpus": 1}
        self.actor_cls = ray.remote(max_restarts=0, **options)(MeasureWorker)
        self.actors = [self.actor_cls.remote(self.make_target) for _ in range(self.num_workers)]
        self.names = {_key(a): f"w{i}" for i, a in enumerate(self.actors)}
        self.workload: Workload | None = None

    def _check_capacity(self) -> int:
        unit = "GPU" if self.config.use_gpus else "CPU"
        capacity = int(self.ray.cluster_resources().get(unit, 0))
        wanted = capacity if self.config.workers == "all" else self.config.workers
        if wanted < 1 or wanted > capacity:
            raise ValueError(f"--workers {self.config.workers} needs {max(wanted, 1)} {unit}(s), but the Ray "
                             f"cluster has {capacity}; ask for at most {capacity}.")
        return wanted

    def name(self, actor) -> str:
        return self.names.setdefault(_key(actor), f"w{len(self.names)}")

    def groups(self, workload: Workload) -> dict[str, Group]:
        """Prepare every actor for `workload` and group them by the hardware each one detected."""
        self.workload = workload
        refs = [a.prepare.remote(workload) for a in self.actors]
        groups: dict[str, Group] = {}
        for actor, (hardware, ctx) in zip(self.actors, self.ray.get(refs, timeout=self.config.prepare_timeout_s)):
            groups.setdefault(hardware.key, Group(hardware=hardware, context=ctx)).actors.append(actor)
        return groups

    def start_replacement(self, group: Group, dead) -> tuple[Any, Any]:
        """Kill `dead` (if still alive) and start a fresh actor in its place. Returns the actor and
        the ref of its preparation; until that is ready, calls to it wait behind it."""
        name = self.name(dead)
        self.ray.kill(dead, no_restart=True)
        fresh = self.actor_cls.remote(self.make_target)
        self.names[_key(fresh)] = f"{name}'"
        self.actors[self.actors.index(dead)] = fresh
        group.actors[group.actors.index(dead)] = fresh
        return fresh, fresh.prepare.remote(self.workload)

    def check_replacement(self, group: Group, prepared_ref) -> None:
        hardware, _ = self.ray.get(prepared_ref, timeout=self.config.prepare_timeout_s)
        if hardware.key != group.hardware.key:
            raise RuntimeError(f"a replacement worker landed on {hardware.key}, not {group.hardware.key}; "
                               "pin workers to one GPU type per node or use a homogeneous cluster")

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        if self.started_ray:
            self.ray.shutdown()


def _key(actor) -> str:
    return actor._actor_id.hex()


class ActorTarget:
    """One actor seen as a Target: the baseline and the confirmation run on a single device."""

    def __init__(self, pool: RayPool, group: Group) -> None:
        self.pool, self.group = pool, group
        self.hardware = group.hardware

    def space_context(self) -> SpaceContext:
        return self.group.context

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        """`on_sample` is not forwarded: pruning needs the driver's study, so pooled trials time fully."""
        from ray.exceptions import GetTimeoutError, RayActorError

        actor = self.group.actors[0]
        wait = None if time_limit_s is None else time_limit_s + self.pool.config.grace_s
        try:
            return self.pool.ray.get(actor.measure.remote(schedule, time_limit_s), timeout=wait)
        except RayActorError as e:
            m = Measurement(outcome=TrialOutcome.CRASHED, message=f"worker died: {type(e).__name__}",
                            killed_worker=True)
        except GetTimeoutError:
            m = Measurement(outcome=TrialOutcome.TIMEOUT, message=f"no result within {wait:g} s; worker replaced",
                            killed_worker=True)
        self.pool.check_replacement(self.group, self.pool.start_replacement(self.group, actor)[1])
        return m


# --- the driver's loop -----------------------------------------------------------------------

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
        self.known, self.budget = Known(study), Budget(config)
        self.heartbeat = Heartbeat(study)
        self.result = StudyResult(study=study)
        self.inflight: dict = {}
        self.idle = list(group.actors)
        self.starting: dict = {}  # fresh actors still preparing: the driver never blocks on them

    def refs(self) -> list:
        return [*self.inflight, *self.starting]

    def dispatch(self) -> None:
        """Give every idle worker a trial while the budget lasts."""
        while self.idle and self.budget.left(self.study):
            actor = self.idle.pop()
            if not self._send(actor):
                self.idle.append(actor)  # answered without a worker: it takes the next trial

    def _send(self, actor) -> bool:
        t0 = time.perf_counter()
        p = propose(self.study, self.space, self.group.context, self.known, self.config, self.heartbeat,
                    explore=self.budget.stuck)
        self.stats.study_s += time.perf_counter() - t0
        if p.answer is None:
            ref = actor.measure.remote(p.schedule, self.config.trial_timeout_s)
            self.inflight[ref] = _InFlight(trial=p.trial, schedule=p.schedule, actor=actor, started=time.monotonic())
            return True
        self._record(p.trial, p.schedule, p.answer, "driver")
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
            m = Measurement(outcome=TrialOutcome.CRASHED, message=f"worker died: {type(e).__name__}",
                            killed_worker=True)
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
            m = Measurement(outcome=TrialOutcome.TIMEOUT, message=f"no result within {limit:g} s; worker replaced",
                            killed_worker=True)
            self._record(job.trial, job.schedule, m, name)

    def interrupt(self) -> None:
        for job in self.inflight.values():
            finish_trial(self.study, job.trial, job.schedule, interrupted())
        self.inflight.clear()
        self.result.interrupted = True

    def close(self) -> None:
        self.heartbeat.close()

    def _replace(self, job: _InFlight) -> None:
        self.known.poison.add(job.schedule.key())
        fresh, ref = self.pool.start_replacement(self.group, job.actor)
        self.starting[ref] = fresh

    def _record(self, trial, schedule: Schedule, m: Measurement, worker: str) -> None:
        t0 = time.perf_counter()
        record_trial(self.study, trial, schedule, m, known=self.known, result=self.result, worker=worker)
        self.heartbeat.discard(trial)
        self.stats.study_s += time.perf_counter() - t0
        self.stats.count(worker, m.outcome.value)
        self.progress.update(m, counted=Budget.counts(m), workers=self.stats.per_worker)
        self.result.exhausted = self.budget.converged(m)


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
    finally:
        for lane in lanes:
            lane.close()
    for lane in lanes:
        lane.interrupt()
    return [lane.result for lane in lanes]


def _charge(lanes: list[Lane], seconds: float) -> None:
    for lane in lanes:
        lane.stats.driver_s += seconds / len(lanes)


def tune_pool(config: TuneConfig, make_target, pool_config: PoolConfig, *, log=print,
              stop=()) -> list[WorkloadResult]:
    """One study per (hardware type, workload). All hardware types search at once, each with
    its own workers; the baseline and the confirmation run on each type's first worker."""
    pool = RayPool(pool_config, make_target)
    results = []
    try:
        log(f"ray pool: {pool.num_workers} worker(s)")
        for workload in config.workloads:
            groups = list(pool.groups(workload).values())
            sessions = [start(workload, ActorTarget(pool, g), config, log=log, position=i)
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


def summary_line(hardware_key: str, stats: PoolStats) -> str:
    per = "; ".join(f"{w}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                    for w, c in sorted(stats.per_worker.items()))
    return f"{hardware_key}: {stats.trials} trial(s) by worker: {per or 'none'}"
