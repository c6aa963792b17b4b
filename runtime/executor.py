"""Run a schedule on an unchanged model: trace once, compile a schedule, call it.

    ex = Executor(case)                  # traces the model into ops once
    run = ex.compile(schedule)           # validates, builds tasks, streams, events
    out = run()                          # the layer's output, written into run.out
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .backends import Backend, Runner, get_backend
from .counters import count
from .graph import Op, OpGraph, Resource, trace
from .plan import Plan, build_plan
from .schedule import Schedule
from .case import Case


@dataclass(kw_only=True)
class Compiled:
    plan: Plan
    runner: Runner
    backend: Backend
    gather: Callable[[], None] | None = None  # joins a graph's per-nano-batch outputs into plan.out

    def __call__(self) -> torch.Tensor:
        self.runner.run()
        if self.gather is not None:
            self.gather()
        return self.plan.out

    @property
    def out(self) -> torch.Tensor:
        return self.plan.out

    def close(self) -> None:
        self.runner.close()


class Executor:
    def __init__(self, case: Case, *, backend: Backend | None = None) -> None:
        self.case = case
        self.device = case.device
        self.backend = backend or get_backend(self.device)
        self.graph: OpGraph = case.graph if case.graph is not None else trace(case.model)
        self._out_like: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        """The plain sequential eager run of the unchanged model."""
        layout = self.case.layout
        layout.check(self.case.inputs)  # before any run: an input batched on another dim is one error
        with torch.no_grad():
            out = self.case.model(*self.case.inputs)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{self.case.name}: the model must return one tensor, but returned {type(out).__name__}.")
        if self.case.nano_inputs is None:  # the fx path joins nano-batches into this output
            layout.check((), out)
        self._out_like = out
        return out

    def compile(self, schedule: Schedule, *, sm_count: int | None = None) -> Compiled:
        """Validate the schedule against this model and batch, and prepare it to run."""
        check_shares(schedule, sm_count)
        if self._out_like is None:
            self.reference()
        out = torch.empty_like(self._out_like)
        plan = build_plan(self.graph, self.case, schedule, out, nano_inputs=self.case.nano_inputs,
                          fresh_each_run=self.case.nano_inputs is not None)
        runner = self.backend.prepare(plan)
        gather = (lambda: self.case.gather(plan)) if self.case.gather is not None else None
        return Compiled(plan=plan, runner=runner, backend=self.backend, gather=gather)

    def profile_ops(self, *, flops_per_byte: float) -> OpGraph:
        """Count each op's FLOPs and bytes on the whole batch and classify its resource:
        copy (no arithmetic), compute (intensity above the machine balance), else memory."""
        compiled = self.compile(Schedule())
        plan, ops = compiled.plan, []
        plan.reset()
        with torch.no_grad():
            for task, op in zip(plan.tasks, self.graph.ops):
                _, c = count(task.fn)
                resource = Resource.COPY if c.only_copies else Resource.COMPUTE \
                    if c.flops / max(c.bytes, 1) >= flops_per_byte else Resource.MEMORY
                ops.append(Op(name=op.name, deps=op.deps, flops=c.flops, bytes=c.bytes, resource=resource))
        compiled.close()
        self.graph = dataclasses.replace(self.graph, ops=tuple(ops))
        return self.graph


def check_shares(schedule: Schedule, sm_count: int | None) -> None:
    total = schedule.total_sm_share
    if total is not None and sm_count is not None and total > sm_count:
        raise ValueError(
            f"streams' sm_share must sum to at most the device's {sm_count} SMs (threads on CPU), "
            f"but {[s.sm_share for s in schedule.streams]} sums to {total}."
        )

