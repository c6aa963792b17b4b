"""Run an unchanged module under the schedule chosen for each live batch.

    layer = ScheduledModule(model_layer, ScheduleMap.load("results", model="llama3-8b"))
    out = layer(*inputs)          # the map (or your policy) picks the schedule for this batch

`chooser` is a ScheduleMap or any policy: a function (BatchLayout) -> Schedule, e.g. a
dual-batch overlap that splits only above a token threshold. Either way the live batch shapes
are counted (`layer.shapes`, the map's own log for a map) and can be saved to tune them.

`ScheduledCalls` is the one call path every consumer of scheduled execution goes through (this
module's ScheduledModule, the HF decoder-layer wrapper, the torch.compile backend): pick the
schedule for the live batch -> the backend for the tensors' device -> the plan cached for
(schedule, live shapes) -> bind the call -> run -> unbind.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Hashable, Protocol, runtime_checkable

import torch
from torch import nn

from .backends import Backend, Runner, get_backend
from .executor import join_nano_outputs
from .batch import BatchLayout
from .graph import trace
from . import parallel
from .parallel import Parallel
from .plan import Plan, build_plan
from .schedule import Schedule
from .shapes import Bucket, ShapeLog
from .case import Case
from .workload import preset_layout_of

log = logging.getLogger("dynaflow")


@runtime_checkable
class Chooser(Protocol):
    """What answers a live batch with a schedule and counts the shapes it meets: a ScheduleMap,
    or any policy wrapped by `as_chooser`."""

    shapes: ShapeLog

    def pick(self, layout: BatchLayout, context_len: int = 0) -> Schedule: ...


class Policy:
    """A plain policy (BatchLayout) -> Schedule as a Chooser; the shapes it meets go to `shapes`."""

    def __init__(self, fn: Callable[[BatchLayout], Schedule], shapes: ShapeLog | None = None) -> None:
        self.fn, self.shapes = fn, shapes if shapes is not None else ShapeLog()

    def pick(self, layout: BatchLayout, context_len: int = 0) -> Schedule:
        self.shapes.add(Bucket.of(layout, context_len))
        return self.fn(layout)


def as_chooser(chooser, shapes: ShapeLog | None = None) -> Chooser:
    """`chooser` if it is one (a ScheduleMap counts shapes in its own log), else the policy wrapped."""
    return chooser if isinstance(chooser, Chooser) else Policy(chooser, shapes)


class ScheduledCalls:
    """The one call path: pick -> backend for the device -> plan cache -> bind -> run -> unbind."""

    def __init__(self, chooser, *, shapes: ShapeLog | None = None, backend: Backend | None = None,
                 capacity: int = 32) -> None:
        self.chooser = as_chooser(chooser, shapes)
        self.backend = backend
        self.plans = PlanCache(capacity)

    @property
    def shapes(self) -> ShapeLog:
        return self.chooser.shapes

    def pick(self, layout: BatchLayout, context_len: int = 0) -> Schedule:
        return self.chooser.pick(layout, context_len)

    def run(self, schedule: Schedule, shape: Hashable, device, prepare: Callable[[], Plan], *call,
            finish: Callable[[Plan, Any], Any] | None = None):
        """Run `schedule` on one call: `prepare()` builds its plan the first time this (schedule,
        shape) is seen; `finish(plan, bound)` reads the results before the plan is unbound."""
        self.backend = self.backend or get_backend(device)
        plan, runner = self.plans.get(schedule, shape, lambda: self._prepared(prepare))
        bound = plan.bind(*call)
        try:
            runner.run()
            return finish(plan, bound) if finish is not None else None
        finally:
            plan.unbind()

    def _prepared(self, prepare: Callable[[], Plan]) -> tuple[Plan, Runner]:
        plan = prepare()
        return plan, self.backend.prepare(plan)


class ScheduledModule(nn.Module):
    def __init__(self, module: nn.Module, chooser: Callable[[BatchLayout], Schedule], *,
                 layout_of: Callable[[tuple], BatchLayout] = preset_layout_of,
                 context_of: Callable[[tuple], int] = lambda inputs: 0,
                 backend: Backend | None = None) -> None:
        super().__init__()
        self.module = module
        self.layout_of, self.context_of = layout_of, context_of
        self.calls = ScheduledCalls(chooser, backend=backend)
        self.shapes, self.plans = self.calls.shapes, self.calls.plans
        self.graph = trace(module)
        self.last_schedule: Schedule | None = None
        self.unfit: set[str] = set()  # schedules that do not fit this module's graph: run sequentially
        self.fit: set[str] = set()  # schedules checked and found to fit (the check is not repeated per call)
        for record in getattr(chooser, "records", None) or ():  # a ScheduleMap's
            self.fits(record.schedule, f"record {record.workload.key}: ")  # a map's misfits said at start-up
        collectives = Parallel.collectives(module)  # a tensor-parallel rank's layer: each nano-batch's own group
        self.around = parallel.current().around(collectives) if collectives else None

    def fits(self, schedule: Schedule, where: str = "") -> bool:
        """Whether the schedule's order names only ops of this module's graph; one that names
        others (a record made for another model) is said once and runs sequentially."""
        if schedule.key() in self.fit:
            return True
        if not (unknown := sorted({s.op for s in schedule.order} - set(self.graph.names))):
            self.fit.add(schedule.key())
            return True
        if schedule.key() not in self.unfit:
            self.unfit.add(schedule.key())
            log.warning("%sschedule %s names op(s) %s, which this module's graph lacks (a record made for another "
                        "model?): it runs sequentially", where, schedule.label, ", ".join(unknown[:3]))
        return False

    def forward(self, *inputs: torch.Tensor):
        layout = self.layout_of(inputs)
        schedule = self.last_schedule = self.calls.pick(layout, self.context_of(inputs))
        if schedule.is_sequential or schedule.key() in self.unfit or not self.fits(schedule):
            return self.module(*inputs)
        # The last op writes its residual add into `out` itself; any other output (another shape, a
        # tuple) stays in each nano-batch's env and is joined by rows after the run.
        out = torch.empty_like(inputs[0]) if self.graph.writes_output else None
        shape = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs) + (layout.request_tokens, layout.request_kinds)
        case = Case(model=self.module, inputs=tuple(inputs), layout=layout, around=self.around)
        joined = self.calls.run(schedule, shape, inputs[0].device, lambda: build_plan(self.graph, case, schedule, out),
                                inputs, out, finish=None if out is not None else
                                lambda plan, _: join_nano_outputs(plan, layout))
        return out if out is not None else joined


class PlanCache:
    """A plan and its prepared runner per (schedule, live shapes), built once and reused: a call
    then only binds its tensors. The most recent `capacity` are kept; an evicted runner is closed
    (its streams and events released). Keyed by the schedule's value (its hash is computed once
    per Schedule object), so a policy returning equal schedules reuses the plan too."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.built = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, schedule: Schedule, shape: Hashable, build: Callable[[], tuple[Any, Runner]]) -> tuple[Any, Runner]:
        key = (schedule, shape)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = (schedule, *build())
            self.built += 1
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)[1][2].close()
        else:
            self._entries.move_to_end(key)
        return entry[1], entry[2]

    def close(self) -> None:
        while self._entries:
            self._entries.popitem()[1][2].close()
