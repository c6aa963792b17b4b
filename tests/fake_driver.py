"""A fake `cuda.bindings.driver` that enforces the green-context rules the driver documents, so
that breaking one fails a test on the CPU:
- a split's remainder cannot be split again (it needs a descriptor and a green context first);
- the SM groups of one descriptor come from one split call, and no group goes to two partitions;
- granularity: from sm_90 at least 8 SMs in steps of 8; on sm_80 at least 4 in steps of 2; or, where
  set, the resource's own minimum partition size and co-scheduling alignment (CUDA 13 reports them);
- a split may make fewer groups than asked (`max_groups`: cluster rules on a real part);
- green contexts are made with CU_GREEN_CTX_DEFAULT_STREAM, their streams CU_STREAM_NON_BLOCKING;
- an event is recorded only on a stream of the context it was made in (a green stream's context is
  its green context); a stream may wait on an event of any context.
With a simulated device (`sim`), events and waits are queued on its streams.
Calls return (CUresult, ...) tuples as cuda-bindings does; a broken rule returns an error code.
"""
from __future__ import annotations

import itertools
import sys
import types
from dataclasses import dataclass, field
from enum import IntEnum

SUCCESS, INVALID_VALUE, INVALID_RESOURCE_CONFIGURATION = 0, 1, 914


class CUdevResourceType(IntEnum):
    CU_DEV_RESOURCE_TYPE_SM = 1


class CUgreenCtxCreate_flags(IntEnum):
    CU_GREEN_CTX_DEFAULT_STREAM = 1


class CUstream_flags(IntEnum):
    CU_STREAM_DEFAULT = 0
    CU_STREAM_NON_BLOCKING = 1


class CUevent_flags(IntEnum):
    CU_EVENT_DEFAULT = 0
    CU_EVENT_DISABLE_TIMING = 2


@dataclass
class _SM:
    smCount: int
    minSmPartitionSize: int = 0  # 0: not reported (a binding before CUDA 13)
    smCoscheduledAlignment: int = 0


@dataclass(eq=False)
class Resource:
    sm: _SM
    split: int | None = None  # the split call it came from; None: the device's whole resource
    remainder: bool = False
    ids: tuple[int, ...] = ()  # which SMs


@dataclass
class FakeDriver:
    num_sms: int = 132
    arch: tuple[int, int] = (9, 0)
    min_partition: int = 0  # reported by the device resource where > 0
    alignment: int = 0
    max_groups: int | None = None  # a split makes at most this many groups
    splits: itertools.count = field(default_factory=itertools.count)
    used: set = field(default_factory=set)  # groups already in a descriptor
    contexts: dict = field(default_factory=dict)  # live green contexts -> their SM ids
    streams: dict = field(default_factory=dict)  # live raw stream handle -> (context, priority)
    handles: itertools.count = field(default_factory=lambda: itertools.count(1000))
    violations: list = field(default_factory=list)
    sim: object = None  # a SimDevice: events and waits go on its streams
    current: list = field(default_factory=list)  # the thread's context stack (empty: primary)
    events: dict = field(default_factory=dict)  # live event handle -> its context (None: primary)

    def _fail(self, code: int, why: str):
        self.violations.append(why)
        return (code,)

    def cuDeviceGet(self, ordinal):
        return SUCCESS, ordinal

    def cuDeviceGetDevResource(self, dev, kind):
        return SUCCESS, Resource(sm=_SM(self.num_sms, self.min_partition, self.alignment), ids=tuple(range(self.num_sms)))

    def cuDevSmResourceSplitByCount(self, nb_groups, resource, use_flags, min_count):
        if resource.remainder:
            return self._fail(INVALID_RESOURCE_CONFIGURATION, "split of a split's remainder")
        minimum, step = (8, 8) if self.arch >= (9, 0) else (4, 2)
        if self.min_partition or self.alignment:
            minimum, step = self.min_partition or self.alignment, self.alignment or 1
        if min_count < minimum or min_count % step:
            return self._fail(INVALID_VALUE, f"minCount {min_count} breaks granularity (min {minimum}, step {step})")
        split = next(self.splits)
        n = min(nb_groups, resource.sm.smCount // min_count, self.max_groups or nb_groups)
        groups = [Resource(sm=_SM(min_count), split=split, ids=resource.ids[i * min_count:(i + 1) * min_count])
                  for i in range(n)]
        rest = resource.ids[n * min_count:]
        return SUCCESS, groups, n, Resource(sm=_SM(len(rest)), split=split, remainder=True, ids=rest)

    def cuDevResourceGenerateDesc(self, groups, n):
        if len(groups) != n or not groups:
            return self._fail(INVALID_VALUE, "descriptor group count")
        if len({g.split for g in groups}) != 1 or any(g.split is None or g.remainder for g in groups):
            return self._fail(INVALID_RESOURCE_CONFIGURATION, "descriptor groups from different split calls")
        if any((g.split, g.ids) in self.used for g in groups):  # partitions of one split must not share a group
            return self._fail(INVALID_RESOURCE_CONFIGURATION, "a group in two descriptors: partitions overlap")
        self.used.update((g.split, g.ids) for g in groups)
        return SUCCESS, tuple(i for g in groups for i in g.ids)

    def cuGreenCtxCreate(self, desc, dev, flags):
        if flags != CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM:
            return self._fail(INVALID_VALUE, "green context without CU_GREEN_CTX_DEFAULT_STREAM")
        ctx = next(self.handles)
        self.contexts[ctx] = desc
        return SUCCESS, ctx

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        if ctx not in self.contexts:
            return self._fail(INVALID_VALUE, "stream on a destroyed green context")
        if flags != CUstream_flags.CU_STREAM_NON_BLOCKING:
            return self._fail(INVALID_VALUE, "green-context stream without CU_STREAM_NON_BLOCKING")
        raw = next(self.handles)
        self.streams[raw] = (ctx, priority)
        return SUCCESS, raw

    def cuStreamDestroy(self, raw):
        self.streams.pop(raw)
        return (SUCCESS,)

    def cuGreenCtxDestroy(self, ctx):
        if any(c == ctx for c, _ in self.streams.values()):
            return self._fail(INVALID_VALUE, "green context destroyed before its streams")
        if any(c == ctx for c, _ in self.events.values()):
            return self._fail(INVALID_VALUE, "green context destroyed before its events")
        self.contexts.pop(ctx)
        return (SUCCESS,)

    def cuCtxFromGreenCtx(self, ctx):
        if ctx not in self.contexts:
            return self._fail(INVALID_VALUE, "context of a destroyed green context")
        return SUCCESS, ("ctx", ctx)

    def cuCtxPushCurrent(self, context):
        self.current.append(context[1])
        return (SUCCESS,)

    def cuCtxPopCurrent(self):
        return SUCCESS, ("ctx", self.current.pop())

    def cuEventCreate(self, flags):
        handle = next(self.handles)
        context = self.current[-1] if self.current else None
        self.events[handle] = (context, self.sim and self._sim_event(context))
        return SUCCESS, handle

    def _sim_event(self, context):
        from test_cuda_backend_sim import SimEvent
        return SimEvent(self.sim, context=context)

    def _stream_context(self, handle):
        return self.streams[handle][0] if handle in self.streams else None

    def cuEventRecord(self, event, stream):
        if event not in self.events:
            return self._fail(INVALID_VALUE, "record of a destroyed event")
        if self._stream_context(stream) != self.events[event][0]:
            return self._fail(INVALID_VALUE, "event recorded on a stream of another context")
        if self.sim:
            self.events[event][1].record(self.sim.by_handle(stream))
        return (SUCCESS,)

    def cuStreamWaitEvent(self, stream, event, flags):
        if event not in self.events:
            return self._fail(INVALID_VALUE, "wait on a destroyed event")
        if self.sim:
            self.sim.by_handle(stream).wait_event(self.events[event][1])
        return (SUCCESS,)

    def cuEventElapsedTime(self, start, end):
        if self.events[start][0] != self.events[end][0]:
            return self._fail(INVALID_VALUE, "elapsed time between events of two contexts")
        return SUCCESS, self.events[start][1].elapsed_time(self.events[end][1])

    def cuEventDestroy(self, event):
        self.events.pop(event)
        return (SUCCESS,)

    def install(self, monkeypatch) -> None:
        module = types.ModuleType("cuda.bindings.driver")
        for name in dir(self):
            if name.startswith("cu"):
                setattr(module, name, getattr(self, name))
        for enum in (CUdevResourceType, CUgreenCtxCreate_flags, CUstream_flags, CUevent_flags):
            setattr(module, enum.__name__, enum)
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.bindings, bindings.driver = bindings, module
        for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.driver", module)):
            monkeypatch.setitem(sys.modules, name, mod)
