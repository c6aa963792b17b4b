"""Trials fanned out over Ray actors: one per GPU (or CPU slot), grouped by hardware type.

Each actor is a Station of tuner/remote.py's protocol (Prepare, Measure, Explain over its one
`handle` method). Each hardware type's actors are one `GroupPool` (tuner/pool.py's protocol)
searched by its own study in the tuning loop (tuner/search.py), all types at once: a dead worker's trial is CRASHED,
a worker past the time limit is killed and its trial is TIMEOUT; either way a fresh worker
takes its place. Ray is imported only here and only
when a pool starts (`--workers`), so the GPU machine and users' servers never need it. Each
actor asks for one GPU and no CPU (an actor holding the only CPU starves everything else); a
worker count the cluster cannot hold is refused at once instead of leaving actors pending.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dynaflow.runtime import Hardware, Measurement, Schedule, Workload
from dynaflow.search_spaces import SpaceContext

from .measuring import Target, crashed
from .pool import Done, Job, PoolLost, measure_one
from .remote import Description, Explain, Measure, Prepare, Reply, Station, died, hung

GRACE_S = 5.0  # beyond a trial's own time limit, before the driver gives up on its worker
CLOSE_S = 10.0  # for the workers to stop what their targets started, before they are killed
CONNECT_S = 5.0  # for a cluster's head to accept a connection, before its address is refused
LOST_S = 10.0  # the head silent this long: the cluster is lost (Ray itself ends the driver after 60 s)


class ClusterLost(PoolLost):
    """The Ray cluster's head stopped answering: the tune ends, saying what is kept."""


class HeadWatch:
    """Whether the cluster's head (its GCS) still answers, asked at most once a second from the
    driver's loop: silent for `lost_s`, the cluster is lost. Ray would retry for 60 s, keep
    dispatching to nodes that cannot report, then end the process with a C++ line."""

    def __init__(self, gcs_address: str | None, lost_s: float = LOST_S) -> None:
        host, _, port = (gcs_address or "").rpartition(":")
        self.where = (host, int(port)) if host and port.isdigit() else None
        self.address, self.lost_s = gcs_address, lost_s
        self.asked, self.silent_since = 0.0, None

    def check(self) -> None:
        now = time.monotonic()
        if self.where is None or now - self.asked < 1.0:
            return
        self.asked = now
        import socket

        try:
            socket.create_connection(self.where, timeout=1.0).close()
            self.silent_since = None
        except OSError:
            self.silent_since = self.silent_since or now
            if now - self.silent_since >= self.lost_s:
                raise ClusterLost(f"the Ray cluster was lost: its head ({self.address}) has not answered for "
                                  f"{self.lost_s:g} s") from None


def _quiet_raylet_messages(log) -> None:
    """Ray's driver prints each raylet's death notice (a dump of that raylet's log, tens of lines,
    even with log_to_driver=False) to stdout; the tool says it in one line instead, once."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_dynaflow", False):
        return
    said = []

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") != "raylet":
            return original(data, *args, **kwargs)
        if not said:
            said.append(True)
            log("ray: the cluster reported a raylet lost (a node or its worker died; Ray's log dump of it left out): "
                "a trial that ran there counts as crashed and is never measured again")

    print_to_stdstream._dynaflow = True
    ray_worker.print_to_stdstream = print_to_stdstream


def check_address(address: str, given_as: str, timeout_s: float = CONNECT_S) -> None:
    """Refuse a cluster address nothing answers at, in one line naming where it came from
    (`ray.init` would retry an unreachable GCS for minutes, printing a warning every few seconds).
    "auto" and "local" are Ray's own lookups of a cluster on this machine, left to it."""
    import socket

    if address in ("auto", "local"):
        return
    where = address.removeprefix("ray://")
    if address.startswith("ray://"):
        import importlib.util

        if importlib.util.find_spec("grpc") is None:  # what Ray Client needs beyond `pip install ray`
            raise ValueError(f"{given_as} {address!r} is a Ray Client address, and Ray Client is not installed "
                             "(pip install 'ray[client]'); or give the head's GCS address, HOST:6379, which "
                             "needs nothing more.")
    host, sep, port = where.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{given_as} {address!r} is not HOST:PORT (or ray://HOST:PORT): the head's address, "
                         f"as `ray start --head` prints it.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as conn:
            speaks = _speaks_http2(conn)
    except OSError as e:
        why = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
        raise ValueError(f"{given_as} {address!r}: no Ray cluster answers there ({why}); "
                         f"start one with `ray start --head`, or give the head's address.") from None
    if not speaks:
        raise ValueError(f"{given_as} {address!r}: something answers there, but not Ray (no gRPC: it did not answer "
                         f"an HTTP/2 handshake); give the head's address, as `ray start --head` prints it.")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame: length 0, type 4, stream 0


def _speaks_http2(conn) -> bool:
    """Whether the server behind `conn` answers an HTTP/2 client preface with a SETTINGS frame, as
    every gRPC server (Ray's GCS and its client server) does first; an HTTP/1 server answers with
    text or closes, anything else says nothing within the connection's timeout."""
    import socket

    try:
        conn.sendall(HTTP2_PREFACE + SETTINGS_FRAME)
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except (socket.timeout, OSError):
        return False
    return head[3] == 0x04 and head[5:9] == b"\x00\x00\x00\x00"  # a SETTINGS frame on stream 0


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolConfig:
    workers: int | str = "all"  # a count, or "all": one per GPU (or CPU slot) in the cluster
    address: str | None = None  # join this Ray cluster; None: RAY_ADDRESS, else start a local one
    # local files of the user's model (a module's .py file or a package's folder) shipped to a
    # joined cluster's workers (Ray's runtime_env py_modules): a node needs only dynaflow-tune
    # installed. Unused by a local cluster, whose workers see the driver's PYTHONPATH
    ship: tuple[str, ...] = ()
    use_gpus: bool = False  # one GPU per actor; False: one CPU slot per actor
    # ranks per worker: a tensor-parallel workload's worker is a group of this many rank processes
    # on one node, which a placement group of as many GPUs (CPU slots) reserves there
    group_size: int = 1
    prepare_timeout_s: float = 900.0
    grace_s: float = GRACE_S  # beyond a trial's time limit before its worker is declared hung

    def __post_init__(self) -> None:
        if self.workers != "all" and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"--workers must be a positive count or 'all', but got {self.workers!r}.")


# --- the workers ---------------------------------------------------------------------------

class MeasureWorker:
    """The actor's body: a Station of tuner/remote.py's protocol, building a target per workload
    with `make_target` and answering the driver's requests (`handle`)."""

    def __init__(self, make_target: Callable[[Workload], Target]) -> None:
        self.station = Station(lambda workload, config: make_target(workload))

    def node(self) -> str:
        """The Ray node this worker runs on (its id, as `ray status` and the dashboard show it)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def handle(self, request) -> Reply:
        """A Prepare closes the last workload's target (a tensor-parallel group's rank processes) first."""
        return self.station.handle(request)

    def close(self) -> None:
        """Stop what the target started (a group's rank processes, its rendezvous folder)."""
        self.station.close()


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
            if address:  # the user's model files travel with the job; everything else the nodes have installed
                env = {"py_modules": list(config.ship)} if config.ship else None
                ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env,
                         logging_level=logging.WARNING)
            else:  # local workers import what the driver can (e.g. --model mymodule:make_case)
                path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
                ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
                         logging_level=logging.WARNING)
        self.watch = HeadWatch(ray.get_runtime_context().gcs_address if self.started_ray else None)
        self.unit = "GPU" if config.use_gpus else "CPU"
        self.num_workers = self._check_capacity()
        n = config.group_size
        options = {"num_gpus": n, "num_cpus": 0} if config.use_gpus else {"num_cpus": n}
        self.actor_cls = ray.remote(max_restarts=0, **options)(MeasureWorker)
        # a tensor-parallel worker's place: its group's GPUs (CPU slots) reserved together on one node
        self.places: dict[str, Any] = {}  # actor -> its placement group (group_size > 1)
        self.actors = [self._start_actor() for _ in range(self.num_workers)]
        self.names = {_key(a): f"w{i}" for i, a in enumerate(self.actors)}
        # actor -> its node's id (a replacement's is added once it is prepared), named with the
        # worker when the cluster has several nodes
        nodes = ray.get([a.node.remote() for a in self.actors], timeout=config.prepare_timeout_s)
        self.nodes: dict[str, str] = {_key(a): node for a, node in zip(self.actors, nodes)}
        self.pending: dict[Any, tuple[Group, Any]] = {}  # a replacement's preparation ref -> (its group, the actor)
        self.many_nodes = len([n for n in ray.nodes() if n.get("Alive")]) > 1
        self.workload: Workload | None = None

    def _start_actor(self, place=None):
        """A worker; with groups, in a placement group of its own (or `place`, a lost worker's,
        which Ray re-creates on another node when its node is gone)."""
        if self.config.group_size == 1:
            return self.actor_cls.remote(self.make_target)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if place is None:
            place = placement_group([{self.unit: self.config.group_size}], strategy="STRICT_PACK")
        actor = self.actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=place, placement_group_bundle_index=0)).remote(self.make_target)
        self.places[_key(actor)] = place
        return actor

    def _check_capacity(self) -> int:
        unit, n = self.unit, self.config.group_size
        if n == 1:
            capacity = int(self.ray.cluster_resources().get(unit, 0))
            wanted = capacity if self.config.workers == "all" else self.config.workers
            if wanted < 1 or wanted > capacity:
                raise ValueError(f"--workers {self.config.workers} needs {max(wanted, 1)} {unit}(s), but the Ray "
                                 f"cluster has {capacity}; ask for at most {capacity}.")
            return wanted
        # a group's ranks share one node: count the groups each node can hold
        nodes = {node["NodeID"][:6]: int(node.get("Resources", {}).get(unit, 0))
                 for node in self.ray.nodes() if node.get("Alive")}
        held = {node: units // n for node, units in nodes.items()}
        capacity = sum(held.values())
        wanted = capacity if self.config.workers == "all" else self.config.workers
        if wanted < 1 or wanted > capacity:
            each = ", ".join(f"node {node}: {units} {unit}(s), {held[node]} group(s)"
                             for node, units in sorted(nodes.items()))
            raise ValueError(f"--workers {self.config.workers} with --tp {n} needs {max(wanted, 1)} group(s) of {n} "
                             f"{unit}s, each group on one node, but the Ray cluster's nodes hold {capacity} ({each}); "
                             f"ask for at most {capacity}" + (", or give nodes more" if capacity == 0 else "") + ".")
        return wanted

    def name(self, actor) -> str:
        """The worker's name in trial records and summaries: w0, w1, ... (a replacement w0'), with its
        node (`w0@1a2b3c`: the node id's first 6 hex digits) when the cluster has several nodes."""
        base = self.names.setdefault(_key(actor), f"w{len(self.names)}")
        node = self.nodes.get(_key(actor))
        return f"{base}@{node[:6]}" if node and self.many_nodes else base

    def ready_actor(self, group: Group):
        """The group's first worker that is prepared (a replacement still waiting for room on a
        node, e.g. after its node was lost, is passed over), for the baseline and the confirmation."""
        if self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in ready:
                g, actor = self.pending.pop(ref)
                self.check_replacement(g, ref, actor)
        return next((a for a in group.actors if _key(a) in self.nodes), group.actors[0])

    def where(self) -> str:
        """Which workers run on which node, one clause per node."""
        by_node: dict[str, list[str]] = {}
        for a in self.actors:
            by_node.setdefault(self.nodes.get(_key(a), "?")[:6], []).append(self.names[_key(a)])
        return "; ".join(f"node {n}: {', '.join(ws)}" for n, ws in sorted(by_node.items()))

    def groups(self, workload: Workload) -> dict[str, Group]:
        """Prepare every actor for `workload` and group them by the hardware each one detected."""
        self.workload = workload
        refs = [a.handle.remote(Prepare(workload)) for a in self.actors]
        groups: dict[str, Group] = {}
        for actor, reply in zip(self.actors, self.ray.get(refs, timeout=self.config.prepare_timeout_s)):
            d = _prepared(reply)
            group = groups.setdefault(d.hardware.key, Group(hardware=d.hardware, context=d.space_context()))
            group.actors.append(actor)
        return groups

    def start_replacement(self, group: Group, dead) -> tuple[Any, Any]:
        """Kill `dead` (if still alive) and start a fresh actor in its place. Returns the actor and
        the ref of its preparation; until that is ready, calls to it wait behind it."""
        name = self.name(dead)
        self.ray.kill(dead, no_restart=True)
        fresh = self._start_actor(self.places.pop(_key(dead), None))
        self.names[_key(fresh)] = f"{name}'"
        self.actors[self.actors.index(dead)] = fresh
        group.actors[group.actors.index(dead)] = fresh
        return fresh, fresh.handle.remote(Prepare(self.workload))

    def check_replacement(self, group: Group, prepared_ref, actor=None) -> None:
        hardware = _prepared(self.ray.get(prepared_ref, timeout=self.config.prepare_timeout_s)).hardware
        if actor is not None and _key(actor) not in self.nodes:
            self.nodes[_key(actor)] = self.ray.get(actor.node.remote(), timeout=self.config.prepare_timeout_s)
        if hardware.key != group.hardware.key:
            raise RuntimeError(f"a replacement worker landed on {hardware.key}, not {group.hardware.key}; "
                               "pin workers to one GPU type per node or use a homogeneous cluster")

    def close(self) -> None:
        if self.watch.silent_since is not None:  # the head is gone: nothing can be asked of the cluster any more
            return
        closing = [a.close.remote() for a in self.actors]  # each its target's processes; a dead one answers not
        self.ray.wait(closing, num_returns=len(closing), timeout=CLOSE_S)
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        if self.places:
            from ray.util.placement_group import remove_placement_group
            for place in {id(p): p for p in self.places.values()}.values():
                remove_placement_group(place)
        if self.started_ray:
            self.ray.shutdown()


def _key(actor) -> str:
    return actor._actor_id.hex()


def _prepared(reply: Reply) -> Description:
    if reply.error is not None:  # the workload cannot be built on that worker
        raise ValueError(reply.error)
    return reply.value


@dataclass(kw_only=True, slots=True)
class _Running:
    job: Job
    actor: Any
    started: float


class GroupPool:
    """The actors of one hardware group as a Pool (`actors`: a subset of them, e.g. one)."""

    def __init__(self, pool: RayPool, group: Group, actors: list | None = None) -> None:
        self.pool, self.group, self.ray = pool, group, pool.ray
        self.idle = list(group.actors if actors is None else actors)
        self.running: dict[Any, _Running] = {}  # object ref -> the job it will answer
        self.starting: dict[Any, Any] = {}  # a fresh actor's preparation ref -> the actor; never blocked on

    def free(self) -> int:
        return len(self.idle)

    def submit(self, job: Job) -> None:
        actor = self.idle.pop()
        request = Measure(job.schedule, job.time_limit_s, paired=job.paired)  # on_sample stays: pruning is the driver's
        self.running[actor.handle.remote(request)] = _Running(job=job, actor=actor, started=time.monotonic())

    def wait(self, timeout_s: float) -> list[Done]:
        self.pool.watch.check()
        refs = [*self.running, *self.starting]
        if not refs:
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:  # and whatever else finished meanwhile
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        done = [d for ref in ready if (d := self._collect(ref)) is not None]
        return done + self._expire(set(ready))

    def _collect(self, ref) -> Done | None:
        from ray.exceptions import RayActorError, RayError

        if ref in self.starting:
            self.pool.check_replacement(self.group, ref, self.starting[ref])
            self.idle.append(self.starting.pop(ref))
            return None
        run = self.running.pop(ref)
        try:
            reply = self.ray.get(ref)
            m = reply.measurement()
            self.idle.append(run.actor)
        except RayActorError as e:
            m = died(f"worker died: {type(e).__name__}").measurement
            self._replace(run.actor)
        except RayError as e:  # the task failed but its worker lives
            m = crashed(e)
            self.idle.append(run.actor)
        return Done(job=run.job, measurement=m, worker=self.pool.name(run.actor))

    def _expire(self, arrived: set) -> list[Done]:
        """Jobs past their limit (and still without a result) are TIMEOUT; their workers are replaced."""
        now, grace, done = time.monotonic(), self.pool.config.grace_s, []
        for ref, run in list(self.running.items()):
            limit = run.job.time_limit_s
            if ref in arrived or limit is None or now - run.started <= limit + grace:
                continue
            del self.running[ref]
            name = self.pool.name(run.actor)
            self._replace(run.actor)
            done.append(Done(job=run.job, worker=name,
                             measurement=hung(f"no result within {limit + grace:g} s; worker replaced").measurement))
        return done

    def _replace(self, dead) -> None:
        fresh, ref = self.pool.start_replacement(self.group, dead)
        self.starting[ref] = fresh


class ActorTarget:
    """One actor seen as a Target: the baseline and the confirmation run on a single device."""

    def __init__(self, pool: RayPool, group: Group) -> None:
        self.pool, self.group = pool, group
        self.hardware = group.hardware

    def space_context(self) -> SpaceContext:
        return self.group.context

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        """`on_sample` is not forwarded: pruning needs the driver's study, so pooled trials time fully."""
        one = GroupPool(self.pool, self.group, actors=[self.pool.ready_actor(self.group)])
        m = measure_one(one, schedule, time_limit_s=time_limit_s)
        for ref, actor in one.starting.items():  # used once prepared (ready_actor), never waited on here
            self.pool.pending[ref] = (self.group, actor)
        return m

    def explain(self, schedule: Schedule) -> dict | None:
        actor = self.pool.ready_actor(self.group)
        reply = self.pool.ray.get(actor.handle.remote(Explain(schedule)), timeout=self.pool.config.prepare_timeout_s)
        if reply.error is not None:
            raise RuntimeError(reply.error)
        return reply.value


@contextmanager
def ray_places(config: PoolConfig, make_target: Callable[[Workload], Target], *, log=print) -> Iterator[Callable]:
    """Start the pool; yields place(workload) -> [(target, pool)], one pair per hardware type
    (the target runs the baseline and the confirmation on that type's first worker)."""
    pool = RayPool(config, make_target)
    _quiet_raylet_messages(log)
    log(f"ray pool: {pool.num_workers} worker(s)")
    if pool.many_nodes:
        log(f"ray pool: {pool.where()}")

    def place(workload: Workload) -> list[tuple[Target, GroupPool]]:
        return [(ActorTarget(pool, g), GroupPool(pool, g)) for g in pool.groups(workload).values()]

    try:
        yield place
    finally:
        pool.close()
