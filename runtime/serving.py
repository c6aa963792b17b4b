"""Run an unchanged module under the schedule chosen for each live batch.

    layer = ScheduledModule(model_layer, ScheduleMap.load("results", model="llama3-8b"))
    out = layer(*inputs)          # the map (or your policy) picks the schedule for this batch

`chooser` is a ScheduleMap or any policy: a function (BatchLayout) -> Schedule, e.g. a
dual-batch overlap that splits only above a token threshold. Either way the live batch shapes
are counted (`layer.shapes`, the map's own log for a map) and can be saved to tune them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .backends import Backend, get_backend
from .batch import BatchLayout
from .graph import trace
from .loading import ScheduleMap
from .plan import build_plan
from .schedule import Schedule
from .shapes import Bucket, ShapeLog
from .workload import Case, preset_layout_of


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
        self.last_schedule: Schedule | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        layout = self.layout_of(inputs)
        schedule = pick(self.chooser, layout, self.context_of(inputs), self.shapes)
        self.last_schedule = schedule
        if schedule.is_sequential:
            return self.module(*inputs)
        backend = self.backend or get_backend(str(inputs[0].device) if inputs[0].is_cuda else "cpu")
        self.backend = backend
        out = torch.empty_like(inputs[0])
        plan = build_plan(self.graph, Case(model=self.module, inputs=tuple(inputs), layout=layout), schedule, out)
        backend.run(plan)
        return out


def pick(chooser, layout: BatchLayout, context_len: int, shapes: ShapeLog | None = None) -> Schedule:
    """A ScheduleMap takes the live context length too and counts the shape itself; a plain
    policy sees the layout only, and the shape is counted in `shapes`."""
    if isinstance(chooser, ScheduleMap):
        return chooser.pick(layout, context_len)
    if shapes is not None:
        shapes.add(Bucket.of(layout, context_len))
    return chooser(layout)
