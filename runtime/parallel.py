"""Tensor parallelism: a sharded layer's collectives as ops, the process groups they run on, and
what every rank of a group must agree on.

A collective is a leaf module (`Collective`) that torch.fx keeps whole: each is one op of the
graph, of resource class network (its FLOPs and bytes are counted from the dispatcher, which sees
torch.distributed's c10d ops; counters.Counts.network_bytes). It is issued asynchronously
(`async_op=True`) and waited for by the task that issued it, so a schedule that puts collectives
on a stream of their own overlaps one nano-batch's collective with another's compute.

Ranks must issue the collectives of one process group in the same order, or they pair up the
wrong tensors (or hang). A schedule may put collectives on any streams and in any order, and
streams run concurrently, so each nano-batch's collectives run on a process group of their own
(keyed by the nano-batch's first request; `Parallel.around`): within one nano-batch the order is
the data flow's, the same on every rank. The unsplit model's own call uses the default group.

Every rank measures the same schedule: the runs are in lockstep through the collectives, and each
decision that ends a measurement early (a failed check, a time limit) is agreed first
(`Parallel.agree`: the maximum over ranks), so no rank leaves another waiting in a collective. A
collective that hangs anyway (a rank died, or stopped issuing) raises after the group's timeout.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .devices import device_type

_local = threading.local()  # the process group this thread's collective task runs on


class Collective(nn.Module):
    """Base of the collective ops: torch.fx keeps their calls whole (graph.trace's tracer), and the
    op they make is classed network by the bytes its c10d call moves (Executor.profile_ops)."""


class AllReduce(Collective):
    """The sum over ranks of each rank's partial result (after a row-parallel projection), in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=getattr(_local, "group", None), async_op=True).wait()
        return x


class ReduceScatter(Collective):
    """Sequence parallelism: the sum over ranks of each rank's partial result, each rank keeping its
    share of the rows (the rows padded with zeros to a multiple of the group's size first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = getattr(_local, "group", None)
        x = _padded(x, dist.get_world_size(group)).contiguous()
        out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
        _REDUCE_SCATTER(out, x, group=group, async_op=True).wait()
        return out

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of `x`'s rows, as forward leaves it (a glue op, not a collective)."""
        world = dist.get_world_size()
        return _padded(x, world).chunk(world)[dist.get_rank()]


class AllGather(Collective):
    """Sequence parallelism: every rank's rows, in rank order (what ReduceScatter split)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = getattr(_local, "group", None)
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
        _ALL_GATHER(out, x, group=group, async_op=True).wait()
        return out


def _padded(x: torch.Tensor, world: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, (-x.shape[0]) % world))


# torch 2.13 renamed them (the old names warn); torch 2.11 has the old ones only
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@contextlib.contextmanager
def _on(group):
    before = getattr(_local, "group", None)
    _local.group = group
    try:
        yield
    finally:
        _local.group = before


def bus_factor(collective: str, world: int) -> float:
    """Bytes each rank moves over its link per byte of the collective's tensor (nccl-tests' bus
    bandwidth convention): 2(n-1)/n for an all-reduce, (n-1)/n for an all-gather or reduce-scatter."""
    if world < 2:
        return 0.0
    return (2.0 if "allreduce" in collective else 1.0) * (world - 1) / world


class Parallel:
    """This process's rank in an initialised torch.distributed group, and the groups per nano-batch."""

    def __init__(self, *, timeout_s: float = 60.0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("tensor parallelism needs torch.distributed initialised (one process per rank); "
                             "`dynaflow-tune ... --tp N` starts the ranks.")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.backend = dist.get_backend()
        self._groups: dict[int, object] = {0: None}  # nano-batch's first request -> its group (None: default)
        self._control = dist.new_group(backend="gloo", timeout=self.timeout)  # agreements: never the model's

    def group_for(self, first_request: int):
        """The process group of the nano-batch starting at `first_request`, made the first time it
        is asked for (plans are built in the same order on every rank, so ranks make them alike)."""
        if first_request not in self._groups:
            self._groups[first_request] = dist.new_group(timeout=self.timeout)
        return self._groups[first_request]

    @staticmethod
    def collectives(model: nn.Module) -> frozenset[str]:
        """The names of a layer's collective ops (its Collective children)."""
        return frozenset(name for name, child in model.named_children() if isinstance(child, Collective))

    def around(self, collectives: frozenset[str]) -> Callable:
        """A Case.around: collective op tasks run on their nano-batch's group, the rest bare."""
        def around(op: str, nano: int, r0: int, r1: int):
            if op not in collectives:
                return None
            group = self.group_for(r0)
            return lambda: _on(group)
        return around

    def agree(self, value: float) -> float:
        """The largest of the ranks' values (every rank calls it at the same point)."""
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return float(t.item())

    def in_turn(self, fn: Callable[[], object]) -> object:
        """fn() on each rank in rank order, one at a time (a device peak measured alone)."""
        result = None
        for r in range(self.world_size):
            if r == self.rank:
                result = fn()
            dist.barrier(group=self._control)
        return result

    def bus_bytes_per_s(self, device: str, dtype: torch.dtype, *, size_bytes: int = 8 * 2**20,
                        repeats: int = 5) -> float:
        """All-reduce bus bandwidth of this group, measured (best of `repeats`): bytes per second
        each rank moves over its link (bus_factor), the bound of a network op."""
        t = torch.ones(size_bytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
        dist.all_reduce(t)  # warm: the first call sets up the pairs
        best = float("inf")
        for _ in range(repeats):
            device_type(device).synchronize(device)
            t0 = time.perf_counter()
            dist.all_reduce(t)
            device_type(device).synchronize(device)
            best = min(best, time.perf_counter() - t0)
        best = self.agree(best)  # every rank uses the same figure: the slowest rank's
        return t.nbytes * bus_factor("allreduce", self.world_size) / best


_CURRENT: Parallel | None = None


def current(*, timeout_s: float = 60.0) -> Parallel:
    """The process's Parallel, made once for its torch.distributed group."""
    global _CURRENT
    if _CURRENT is None or not dist.is_initialized():
        _CURRENT = Parallel(timeout_s=timeout_s)
    return _CURRENT


def reset() -> None:
    """Forget the process's Parallel (its group was destroyed)."""
    global _CURRENT
    _CURRENT = None
