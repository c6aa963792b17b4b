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

Output = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def clone_output(out: Output) -> Output:
    """A copy of an output (a tensor or a flat tuple/list of them) no later run overwrites."""
    return type(out)(t.clone() for t in out) if isinstance(out, (tuple, list)) else out.clone()


def first_tensor(out) -> torch.Tensor:
    """The output itself, or the first tensor of a tuple/list of values."""
    if isinstance(out, torch.Tensor):
        return out
    return next(o for o in out if isinstance(o, torch.Tensor))


@dataclass(kw_only=True)
class Compiled:
    plan: Plan
    runner: Runner
    backend: Backend
    gather: Callable[[], None] | None = None  # joins a graph's per-nano-batch outputs into plan.out
    device: torch.device = torch.device("cpu")  # where it runs (the case's device)

    def __call__(self) -> Output:
        self.runner.run()
        if self.gather is not None:
            self.gather()
        return self.plan.out

    @property
    def out(self) -> Output:
        """The output of the last run: a tensor, or a tuple (list) of them for a model returning one."""
        return self.plan.out

    def close(self) -> None:
        self.runner.close()


class Executor:
    def __init__(self, case: Case, *, backend: Backend | None = None) -> None:
        self.case = case
        self.device = case.device
        self.backend = backend or get_backend(self.device)
        self.graph: OpGraph = case.graph if case.graph is not None else trace(case.model)
        self._out_like: Output | None = None

    def reference(self) -> Output:
        """The plain sequential eager run of the unchanged model: a tensor, or a flat tuple (list)
        of tensors, each batched on its own dim (BatchLayout.output_dims)."""
        layout = self.case.layout
        layout.check(self.case.inputs)  # before any run: an input batched on another dim is one error
        with torch.no_grad():
            out = self.case.model(*self.case.inputs)
        if not isinstance(out, (torch.Tensor, tuple, list)) or isinstance(out, (tuple, list)) and (
                not out or not all(isinstance(t, torch.Tensor) for t in out)):
            raise ValueError(f"{self.case.name}: the model must return a tensor or a flat tuple/list of tensors, but "
                             f"returned {_kind_of(out)}.")
        if self.case.nano_inputs is None:  # the fx path joins nano-batches into this output
            layout.check((), out)
        self._out_like = out
        return out

    def compile(self, schedule: Schedule, *, sm_count: int | None = None) -> Compiled:
        """Validate the schedule against this model and batch, and prepare it to run."""
        check_shares(schedule, sm_count)
        if self._out_like is None:
            self.reference()
        several = isinstance(self._out_like, (tuple, list))
        out = None if several else torch.empty_like(self._out_like)
        plan = build_plan(self.graph, self.case, schedule, out, nano_inputs=self.case.nano_inputs,
                          fresh_each_run=self.case.nano_inputs is not None)
        runner = self.backend.prepare(plan)
        if schedule.is_sequential and self.case.sequential is not None:  # the call serving makes for it
            runner = _calling(self.case, plan, runner)
            return Compiled(plan=plan, runner=runner, backend=self.backend, device=self.device)
        gather = (lambda: self.case.gather(plan)) if self.case.gather is not None else None
        if several and gather is None:  # each nano-batch's elements stay in its env; join them by rows
            gather = lambda: setattr(plan, "out", join_nano_outputs(plan, self.case.layout))
        return Compiled(plan=plan, runner=runner, backend=self.backend, gather=gather, device=self.device)

    def profile_ops(self, *, flops_per_byte: float) -> OpGraph:
        """Count each op's FLOPs and bytes on the whole batch and classify its resource: network
        (a collective; its bytes are those each rank moves over the link), copy (no arithmetic),
        compute (intensity above the machine balance), else memory."""
        compiled = self.compile(Schedule())
        plan, ops = compiled.plan, []
        plan.reset()
        with torch.no_grad():
            for task, op in zip(plan.tasks, self.graph.ops):
                _, c = count(task.fn)
                if c.network_bytes:  # a collective: its bytes are those over the link
                    ops.append(Op(name=op.name, deps=op.deps, flops=c.flops, bytes=c.network_bytes,
                                  resource=Resource.NETWORK))
                    continue
                resource = Resource.COPY if c.only_copies else Resource.COMPUTE \
                    if c.flops / max(c.bytes, 1) >= flops_per_byte else Resource.MEMORY
                ops.append(Op(name=op.name, deps=op.deps, flops=c.flops, bytes=c.bytes, resource=resource))
        compiled.close()
        self.graph = dataclasses.replace(self.graph, ops=tuple(ops))
        return self.graph


def _calling(case: Case, plan: Plan, runner: Runner) -> Runner:
    """A runner making the case's own sequential call (plan.out is what it returns); the plan's
    tasks stay for counting (profile_ops) and timelines."""
    def run() -> None:
        with torch.no_grad():
            plan.out = case.sequential(*case.inputs)
    return dataclasses.replace(runner, run=runner.around(run), notes={**runner.notes, "sequential": "the model's own call "
                                                       "(as serving makes it), not its ops one by one"})


def join_nano_outputs(plan: Plan, layout) -> Output:
    """After a run: the nano-batches' graph outputs joined into the whole batch's (BatchLayout.join)."""
    return layout.join([plan.outputs(b) for b in range(len(plan.ranges))])


def _kind_of(out) -> str:
    if isinstance(out, (tuple, list)):
        inner = sorted({type(t).__name__ for t in out if not isinstance(t, torch.Tensor)})
        return f"a {type(out).__name__} holding {', '.join(inner)}" if inner else f"an empty {type(out).__name__}"
    return f"a {type(out).__name__}"


def check_shares(schedule: Schedule, sm_count: int | None) -> None:
    total = schedule.total_sm_share
    if total is not None and sm_count is not None and total > sm_count:
        raise ValueError(
            f"streams' sm_share must sum to at most the device's {sm_count} SMs (threads on CPU), "
            f"but {[s.sm_share for s in schedule.streams]} sums to {total}."
        )

