"""A pool of Ray actors that measure schedules, one per GPU (or CPU slot), grouped by hardware.

Ray is imported only here and only when a pool is started (`--workers`), so the GPU machine
and users' servers never need it. Each actor asks for one GPU and no CPU (an actor holding the
only CPU starves everything else); a worker count the cluster cannot hold is refused at once,
instead of leaving actors pending forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from dynaflow.runtime import Hardware, Measurement, OpGraph, Schedule, TrialOutcome, Workload
from dynaflow.search_spaces import SpaceContext

from .measurer import Measurer


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


class MeasureWorker:
    """The actor's body: builds a measurer per workload and measures schedules with it."""

    def __init__(self, make_measurer: Callable[[Workload], Measurer]) -> None:
        self.make_measurer = make_measurer
        self.measurer: Measurer | None = None

    def prepare(self, workload: Workload) -> tuple[Hardware, SpaceContext]:
        self.measurer = self.make_measurer(workload)
        ctx = self.measurer.space_context()
        light = OpGraph(ops=ctx.graph.ops, module=None, writes_output=ctx.graph.writes_output)  # no weights
        return self.measurer.hardware, SpaceContext(hardware=ctx.hardware, graph=light, layout=ctx.layout)

    def measure(self, schedule: Schedule, time_limit_s: float | None) -> Measurement:
        try:
            return self.measurer.measure(schedule, time_limit_s=time_limit_s)
        except Exception as e:  # raised, not died: the worker lives on
            return Measurement(outcome=TrialOutcome.CRASHED, message=f"{type(e).__name__}: {e}")

    def pid(self) -> int:
        return os.getpid()


@dataclass(kw_only=True)
class Group:
    """The actors of one hardware type, ready for one workload."""

    hardware: Hardware
    context: SpaceContext
    actors: list[Any] = field(default_factory=list)


class RayPool:
    def __init__(self, config: PoolConfig, make_measurer: Callable[[Workload], Measurer]) -> None:
        import ray

        self.ray, self.config, self.make_measurer = ray, config, make_measurer
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
        self.actors = [self._new_actor() for _ in range(self.num_workers)]
        self.names = {self._key(a): f"w{i}" for i, a in enumerate(self.actors)}
        self.workload: Workload | None = None

    def _check_capacity(self) -> int:
        total = self.ray.cluster_resources()
        unit = "GPU" if self.config.use_gpus else "CPU"
        capacity = int(total.get(unit, 0))
        wanted = capacity if self.config.workers == "all" else self.config.workers
        if wanted < 1 or wanted > capacity:
            raise ValueError(f"--workers {self.config.workers} needs {max(wanted, 1)} {unit}(s), but the Ray "
                             f"cluster has {capacity}; ask for at most {capacity}.")
        return wanted

    def _new_actor(self):
        return self.actor_cls.remote(self.make_measurer)

    @staticmethod
    def _key(actor) -> str:
        return actor._actor_id.hex()

    def name(self, actor) -> str:
        return self.names.setdefault(self._key(actor), f"w{len(self.names)}")

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
        fresh = self._new_actor()
        self.names[self._key(fresh)] = f"{name}'"
        self.actors[self.actors.index(dead)] = fresh
        group.actors[group.actors.index(dead)] = fresh
        return fresh, fresh.prepare.remote(self.workload)

    def check_replacement(self, group: Group, prepared_ref) -> None:
        hardware, _ = self.ray.get(prepared_ref, timeout=self.config.prepare_timeout_s)
        if hardware.key != group.hardware.key:
            raise RuntimeError(f"a replacement worker landed on {hardware.key}, not {group.hardware.key}; "
                               "pin workers to one GPU type per node or use a homogeneous cluster")

    def replace(self, group: Group, dead) -> Any:
        fresh, ref = self.start_replacement(group, dead)
        self.check_replacement(group, ref)
        return fresh

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        if self.started_ray:
            self.ray.shutdown()


class ActorMeasurer:
    """One actor seen as a Measurer: the baseline and the confirmation run on a single device."""

    def __init__(self, pool: RayPool, group: Group) -> None:
        self.pool, self.group = pool, group
        self.hardware = group.hardware

    def space_context(self) -> SpaceContext:
        return self.group.context

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        """`on_sample` is not forwarded: pruning needs the driver's study, so pooled trials time fully."""
        from ray.exceptions import GetTimeoutError, RayActorError

        actor = self.group.actors[0]
        try:
            wait = None if time_limit_s is None else time_limit_s + self.pool.config.grace_s
            return self.pool.ray.get(actor.measure.remote(schedule, time_limit_s), timeout=wait)
        except RayActorError as e:
            self.pool.replace(self.group, actor)
            return Measurement(outcome=TrialOutcome.CRASHED, message=f"worker died: {type(e).__name__}")
        except GetTimeoutError:
            self.pool.replace(self.group, actor)
            return Measurement(outcome=TrialOutcome.TIMEOUT, message=f"no result within {wait:g} s; worker replaced")
