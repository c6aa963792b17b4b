"""Run an unchanged module under the schedule chosen for each live batch.

    layer = ScheduledModule(model_layer, ScheduleMap.load("results", model="llama3-8b"))
    out = layer(*inputs)          # the map (or your policy) picks the schedule for this batch

`chooser` is a ScheduleMap or any policy: a function (BatchLayout) -> Schedule, e.g. a
dual-batch overlap that splits only above a token threshold. Either way the live batch shapes
are counted (`layer.shapes`, the map's own log for a map) and can be saved to tune them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch
from torch import nn

from .backends import Backend, Runner, get_backend
from .batch import BatchLayout
from .graph import trace
from .loading import ScheduleMap
from .plan import build_plan
from .schedule import Schedule
from .shapes import Bucket, ShapeLog
from .case import Case
from .workload import preset_layout_of


class ScheduledModule(nn.Module):
    def __init__(self, module: nn.Module, chooser: Callable[[BatchLayout], Schedule], *,
                 layout_of: Callable[[tuple], BatchLayout] = preset_layout_of,
                 context_of: Callable[[tuple], int] = lambda inputs: 0,
                 backend: Backend | None = None) -> None:
        super().__init__()
        self.module = module
        self.chooser, self.layout_of, self.context_of = chooser, layout_of, context_of
        self.shapes = chooser.shapes if isinstance(chooser, ScheduleMap) else ShapeLog()
        self.graph = trace(module)
        self.backend = backend
        self.plans = PlanCache()
        self.last_schedule: Schedule | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        layout = self.layout_of(inputs)
        schedule = pick(self.chooser, layout, self.context_of(inputs), self.shapes)
        self.last_schedule = schedule
        if schedule.is_sequential:
            return self.module(*inputs)
        self.backend = self.backend or get_backend(inputs[0].device)
        out = torch.empty_like(inputs[0])
        shape = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs) + (layout.request_tokens, layout.request_kinds)
        plan, runner = self.plans.get(schedule, shape, lambda: self._prepare(schedule, inputs, layout, out))
        plan.bind(inputs, out)
        runner.run()
        return out

    def _prepare(self, schedule: Schedule, inputs, layout: BatchLayout, out: torch.Tensor):
        plan = build_plan(self.graph, Case(model=self.module, inputs=tuple(inputs), layout=layout), schedule, out)
        return plan, self.backend.prepare(plan)


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


def pick(chooser, layout: BatchLayout, context_len: int, shapes: ShapeLog | None = None) -> Schedule:
    """A ScheduleMap takes the live context length too and counts the shape itself; a plain
    policy sees the layout only, and the shape is counted in `shapes`."""
    if isinstance(chooser, ScheduleMap):
        return chooser.pick(layout, context_len)
    if shapes is not None:
        shapes.add(Bucket.of(layout, context_len))
    return chooser(layout)
