"""Disjoint SM partitions from CUDA green contexts, through cuda-bindings' driver API.

torch's own GreenContext.create() splits the whole device on each call, so two of them can
overlap (pytorch/pytorch#195378). Here the device's SM resource is split once, one share after
another from what remains, so the partitions are disjoint by construction. Shares are rounded
up by the driver to its granularity (8 SMs on Hopper); the granted sizes are returned.

A search meets many share sets; `StreamSets` keeps the most recent few and destroys the green
contexts of a set no runner holds when it needs room, so a long search does not exhaust them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch


class PartitionUnavailable(RuntimeError):
    """Raised with the reason when SM partitions cannot be made on this device or stack."""


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise PartitionUnavailable(f"CUDA driver call failed with {err!r}")
    return rest[0] if len(rest) == 1 else rest


def make_partitioned_streams(device_index: int, shares: list[int], priorities: list[int]):
    """One stream per share, on disjoint SM partitions.
    Returns (streams, granted SM counts, close): close() destroys the streams and green contexts."""
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise PartitionUnavailable(f"cuda-bindings is not installed ({e}); pip install cuda-python") from None
    torch.cuda.init()
    dev = _check(driver.cuDeviceGet(device_index))
    remaining = _check(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    streams, granted, made = [], [], []  # made: (green context, raw stream) to destroy on close

    def close() -> None:
        for ctx, raw in reversed(made):
            if raw is not None:
                driver.cuStreamDestroy(raw)
            driver.cuGreenCtxDestroy(ctx)
        made.clear()

    try:
        for share, priority in zip(shares, priorities):
            groups, _, remaining = _check(driver.cuDevSmResourceSplitByCount(1, remaining, 0, share))
            part = groups[0]
            desc = _check(driver.cuDevResourceGenerateDesc([part], 1))
            ctx = _check(driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            made.append((ctx, None))
            raw = _check(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority))
            made[-1] = (ctx, raw)
            streams.append(torch.cuda.get_stream_from_external(int(raw), device=device_index))
            granted.append(int(part.sm.smCount))
    except BaseException:
        close()  # a later share failed: the partitions made so far are not kept
        raise
    return streams, granted, close


@dataclass(kw_only=True)
class StreamSet:
    streams: list
    notes: dict[str, str]
    close: Callable[[], None] = lambda: None
    users: int = 0  # runners holding it; a set in use is never destroyed


@dataclass(kw_only=True)
class StreamSets:
    """Stream sets by key, least recently used first. Past `capacity`, sets no runner holds are
    destroyed after `synchronize()` (their work done); sets in use stay, however many."""

    make: Callable[[Hashable], StreamSet]
    synchronize: Callable[[], None]
    capacity: int = 16
    _sets: OrderedDict = field(default_factory=OrderedDict)

    def acquire(self, key: Hashable) -> StreamSet:
        entry = self._sets.get(key)
        if entry is None:
            self._make_room()
            entry = self._sets[key] = self.make(key)
        self._sets.move_to_end(key)
        entry.users += 1
        return entry

    def release(self, key: Hashable) -> None:
        entry = self._sets.get(key)
        if entry is not None and entry.users > 0:
            entry.users -= 1

    def __len__(self) -> int:
        return len(self._sets)

    def _make_room(self) -> None:
        """Room for one more set: close the least recently used idle sets past capacity."""
        idle = [k for k, e in self._sets.items() if e.users == 0]
        excess = len(self._sets) + 1 - self.capacity
        if excess <= 0 or not idle:
            return
        self.synchronize()
        for key in idle[:excess]:
            self._sets.pop(key).close()
