"""Disjoint SM partitions from CUDA green contexts, through cuda-bindings' driver API.

torch's own GreenContext.create() splits the whole device on each call, so two of them can
overlap (pytorch/pytorch#195378). The driver's rules (cuda-bindings docs): a split's remainder
cannot be split again without first creating a descriptor and a green context, and the SM
resources in one descriptor must come from one split call. So the device's SM resource is split
once, into groups of the partition granularity (the resource's own minimum partition size,
rounded up to its co-scheduling alignment, as CUDA 13 reports them; where the binding lacks
those fields, 8 SMs from sm_90 and 4 before), and each partition is one descriptor of k of those
groups: disjoint by construction. The driver may make fewer groups than the SMs would allow
(cluster rules); the SMs each partition was granted are read back from its groups.

Shares the device cannot grant (not a multiple of the granularity, more groups than it has) are
a ValueError: the schedule is invalid here. A stack without green contexts (no cuda-bindings,
an old driver, a missing symbol) raises PartitionUnavailable with the reason.

A search meets many share sets; `StreamSets` keeps the most recent few and destroys the green
contexts of a set no runner holds when it needs room, so a long search does not exhaust them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch


def sm_granularity(arch: str) -> int:
    """SMs per partition step by architecture, where the driver does not say: 8 from sm_90 (its
    minimum and step), 4 before (sm_80's minimum; its step of 2 cannot make every group of one
    split a legal partition on its own)."""
    return 8 if float(arch) >= 9.0 else 4


class PartitionUnavailable(RuntimeError):
    """Raised with the reason when this stack cannot make SM partitions at all."""


def partition_step(sm, arch: str) -> int:
    """SMs per group of the one split: the resource's minimum partition size rounded up to its
    co-scheduling alignment (CUdevSmResource, CUDA 13); the architecture's rule where the binding
    reports neither."""
    minimum = int(getattr(sm, "minSmPartitionSize", 0) or 0)
    align = int(getattr(sm, "smCoscheduledAlignment", 0) or 0)
    if not minimum and not align:
        return sm_granularity(arch)
    minimum, align = minimum or align, align or 1
    return -(-minimum // align) * align


def sm_layout(device_index: int) -> tuple[int | None, int | None]:
    """(SMs per partition step, groups one split gives) as this device's driver reports them;
    (None, None) where the stack has no green contexts (the architecture's rule then applies)."""
    try:
        _, _, step, _, num_groups = _one_split(_driver(), device_index)
        return step, num_groups
    except (PartitionUnavailable, AttributeError, TypeError, RuntimeError):
        return None, None


def _one_split(driver, device_index: int):
    """The device's SMs split once into groups of its partition step:
    (device, "sm_XY", step, the groups, how many)."""
    torch.cuda.init()
    dev = _check(driver.cuDeviceGet(device_index))
    whole = _check(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    major, minor = torch.cuda.get_device_capability(device_index)
    step = partition_step(whole.sm, f"{major}.{minor}")
    groups, num_groups, _ = _check(driver.cuDevSmResourceSplitByCount(whole.sm.smCount // step, whole, 0, step))
    return dev, f"sm_{major}{minor}", step, groups, int(num_groups)


def _check(result, error: type[Exception] = PartitionUnavailable):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise error(f"CUDA driver call failed with {err!r}")
    return rest[0] if len(rest) == 1 else rest


class TorchMark:
    """An event of the primary context (torch's): what streams torch made record."""

    def __init__(self, timing: bool = False) -> None:
        self.event = torch.cuda.Event(enable_timing=timing)

    def record(self, stream) -> None:
        self.event.record(stream)

    def block(self, stream) -> None:
        """Make `stream` wait for the work before the last record (any context may wait)."""
        stream.wait_event(self.event)

    def elapsed_ms(self, end: "TorchMark") -> float:
        return self.event.elapsed_time(end.event)

    def close(self) -> None:
        pass


class GreenMark:
    """An event made inside one green context. The driver lets a stream record only events of its
    own context, and a green stream's context is its green context, so a torch event (primary
    context) must never be recorded on one; waiting on an event of any context is allowed."""

    def __init__(self, driver, green_ctx, timing: bool = False) -> None:
        self.driver = driver
        context = _check(driver.cuCtxFromGreenCtx(green_ctx), RuntimeError)
        _check(driver.cuCtxPushCurrent(context), RuntimeError)
        try:
            flags = driver.CUevent_flags.CU_EVENT_DEFAULT if timing else driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
            self.handle = _check(driver.cuEventCreate(flags), RuntimeError)
        finally:
            _check(driver.cuCtxPopCurrent(), RuntimeError)

    def record(self, stream) -> None:
        _check(self.driver.cuEventRecord(self.handle, stream.cuda_stream), RuntimeError)

    def block(self, stream) -> None:
        _check(self.driver.cuStreamWaitEvent(stream.cuda_stream, self.handle, 0), RuntimeError)

    def elapsed_ms(self, end: "GreenMark") -> float:
        return float(_check(self.driver.cuEventElapsedTime(self.handle, end.handle), RuntimeError))

    def close(self) -> None:
        if self.handle is not None:
            self.driver.cuEventDestroy(self.handle)
            self.handle = None


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise PartitionUnavailable(f"cuda-bindings is not installed ({e}); pip install cuda-bindings") from None
    return driver


def make_partitioned_streams(device_index: int, shares: list[int], priorities: list[int]):
    """One stream per share (priorities[i] goes with shares[i]), on disjoint SM partitions.
    Returns (streams, granted SM counts, marks, close): marks[i](timing) makes an event of stream
    i's green context; close() destroys the streams and green contexts."""
    driver = _driver()
    made: list = []  # (green context, raw stream) to destroy on close

    def close() -> None:
        for ctx, raw in reversed(made):
            if raw is not None:
                driver.cuStreamDestroy(raw)
            driver.cuGreenCtxDestroy(ctx)
        made.clear()

    try:
        streams, granted = _make(driver, device_index, shares, priorities, made)
        marks = [lambda timing=False, ctx=ctx: GreenMark(driver, ctx, timing) for ctx, _ in made]
    except PartitionUnavailable:
        close()
        raise
    except (AttributeError, TypeError, RuntimeError) as e:  # a binding or driver without green contexts
        close()
        raise PartitionUnavailable(f"{type(e).__name__}: {e}") from None
    except BaseException:
        close()  # a share the device cannot grant: the partitions made so far are not kept
        raise
    return streams, granted, marks, close


def _make(driver, device_index: int, shares: list[int], priorities: list[int], made: list):
    dev, arch, step, groups, num_groups = _one_split(driver, device_index)
    bad = [s for s in shares if s < step or s % step]
    if bad:
        raise ValueError(f"streams' sm_share must be multiples of {step} SMs on {arch} (the driver's "
                         f"partition step), but got {shares} (bad: {bad}).")
    need = sum(s // step for s in shares)
    if need > num_groups:
        raise ValueError(f"streams' sm_share sum to {sum(shares)} SMs, but this device splits into {num_groups} "
                         f"groups of {step} ({num_groups * step} SMs usable).")
    streams, granted, at = [], [], 0
    for share, priority in zip(shares, priorities):
        part = list(groups[at:at + share // step])
        at += len(part)
        desc = _check(driver.cuDevResourceGenerateDesc(part, len(part)))
        ctx = _check(driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        made.append((ctx, None))
        raw = _check(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority))
        made[-1] = (ctx, raw)
        streams.append(torch.cuda.get_stream_from_external(int(raw), device=device_index))
        granted.append(sum(int(g.sm.smCount) for g in part))
    return streams, granted


@dataclass(kw_only=True)
class StreamSet:
    """Streams of one (shares, priorities) key; marks[i](timing) makes an event that stream i may
    record (one of its own context); a set of torch streams gets torch events."""

    streams: list
    notes: dict[str, str]
    marks: list[Callable[..., object]] | None = None
    close: Callable[[], None] = lambda: None
    users: int = 0  # runners holding it; a set in use is never destroyed

    def mark(self, stream: int, timing: bool = False):
        return self.marks[stream](timing) if self.marks else TorchMark(timing)


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
