"""Run an unchanged module under the schedule chosen for each live batch.

    layer = ScheduledModule(model_layer, ScheduleMap.load("results", model="llama3-8b"))
    out = layer(*inputs)          # the map (or your policy) picks the schedule for this batch

`chooser` is a ScheduleMap or any policy: a function (BatchLayout) -> Schedule, e.g. a
dual-batch overlap that splits only above a token threshold.
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
from .workload import Case, preset_layout_of


class ScheduledModule(nn.Module):
    def __init__(self, module: nn.Module, chooser: Callable[[BatchLayout], Schedule], *,
                 layout_of: Callable[[tuple], BatchLayout] = preset_layout_of,
                 context_of: Callable[[tuple], int] = lambda inputs: 0,
                 backend: Backend | None = None) -> None:
        super().__init__()
        self.module = module
        self.chooser, self.layout_of, self.context_of = chooser, layout_of, context_of
        self.graph = trace(module)
        self.backend = backend
        self.last_schedule: Schedule | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        layout = self.layout_of(inputs)
        schedule = pick(self.chooser, layout, self.context_of(inputs))
        self.last_schedule = schedule
        if schedule.is_sequential:
            return self.module(*inputs)
        backend = self.backend or get_backend(str(inputs[0].device) if inputs[0].is_cuda else "cpu")
        self.backend = backend
        out = torch.empty_like(inputs[0])
        plan = build_plan(self.graph, Case(model=self.module, inputs=tuple(inputs), layout=layout), schedule, out)
        backend.run(plan)
        return out


def pick(chooser, layout: BatchLayout, context_len: int) -> Schedule:
    """A ScheduleMap takes the live context length too; a plain policy sees the layout only."""
    return chooser.pick(layout, context_len) if isinstance(chooser, ScheduleMap) else chooser(layout)
