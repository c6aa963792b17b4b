"""Lower (graph, inputs, schedule) to a list of tasks: one per (op, nano-batch), in issue order.

A task runs one op's submodule on one nano-batch's values, on one stream, after waiting for
the tasks on *other* streams it reads from (same-stream order is the issue order). Values are
dropped after their last reader when producer and readers share a stream; values that cross
streams live until the run ends, so no allocator can reuse memory another stream still reads.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from . import validate
from .graph import OpGraph
from .schedule import Schedule, Step
from .case import Case


@dataclass(kw_only=True, slots=True)
class Task:
    op: str
    nano: int
    stream: int
    fn: Callable[[], None]
    waits: tuple[int, ...]  # indices of tasks on other streams that must finish first


@dataclass(kw_only=True)
class Plan:
    schedule: Schedule
    tasks: list[Task]
    out: torch.Tensor
    ranges: list[tuple[int, int]]
    join_copies: bool  # True when the graph could not write its output in place
    envs: list[dict] = field(default_factory=list)
    reset: Callable[[], None] = lambda: None
    # The binding protocol every consumer uses: bind(*call) puts one call's tensors where the tasks
    # read them (fx plans: bind(inputs, out)) and returns what the caller needs back; unbind()
    # drops them after the call, so a cached plan keeps no call's values alive.
    bind: Callable[..., object] | None = None
    unbind: Callable[[], None] = lambda: None
    outputs: Callable[[int], object] | None = None  # outputs(b): nano-batch b's graph outputs, after a run

    @property
    def num_streams(self) -> int:
        return len(self.schedule.streams)


def default_order(graph: OpGraph, num_nano: int) -> tuple[Step, ...]:
    """Nano-batch by nano-batch, ops in graph order, stream 0: the sequential issue order."""
    return tuple(Step(op=op, nano=b) for b in range(num_nano) for op in graph.names)


def staggered_order(graph: OpGraph, num_nano: int, stagger: int, stream_of) -> tuple[Step, ...]:
    """Nano-batch b issues op j at slot j + b * stagger: stagger 0 is op-major, a large one nano-major.
    Within a nano-batch ops keep graph order, so every dependency is issued first.
    stream_of(op name, nano-batch) -> the stream it runs on."""
    names = graph.names
    slots = sorted((j + b * stagger, b, j) for b in range(num_nano) for j in range(len(names)))
    return tuple(Step(op=names[j], nano=b, stream=stream_of(names[j], b)) for _, b, j in slots)


def check_order(order: tuple[Step, ...], graph: OpGraph, num_nano: int) -> None:
    """Every (op, nano) exactly once, each after the steps it reads from."""
    known = set(graph.names)
    done: set[tuple[str, int]] = set()
    for step in order:
        if step.op not in known:
            raise ValueError(f"order names op {validate.short(step.op)}, which the graph lacks; "
                             f"ops: {validate.names(graph.names)}.")
        for dep in graph.op(step.op).deps:
            if (dep, step.nano) not in done:
                raise ValueError(
                    f"order issues ({step.op!r}, nano {step.nano}) before its input ({dep!r}, nano {step.nano}); "
                    "each step must come after the steps it reads from."
                )
        done.add((step.op, step.nano))
    missing = [(op, b) for b in range(num_nano) for op in graph.names if (op, b) not in done]
    if missing:
        lacks = ", ".join(f"({validate.short(op)}, {nano})" for op, nano in missing[:4])
        raise ValueError(f"order must hold every (op, nano-batch) once, but lacks {lacks} ({len(missing)} in all).")


def build_plan(graph: OpGraph, case: Case, schedule: Schedule, out: torch.Tensor | None, *,
               nano_inputs: Callable[[tuple, int, int], tuple] | None = None, fresh_each_run: bool = False) -> Plan:
    """`nano_inputs(inputs, r0, r1)`: a nano-batch's graph inputs (default: the layout's row and
    token views). A graph returning several values (dynamo's, a model's tuple), or any graph given
    no `out`, is not joined here: its outputs stay in each nano-batch's env (`Plan.outputs(b)`) for
    the caller to gather. `fresh_each_run`: the
    nano-batch inputs are made again at every run's start (inputs the graph writes in place are
    then fresh copies each time, so every run starts from the same state)."""
    ranges = case.layout.request_ranges(schedule.split_unit, schedule.split_sizes)
    order = schedule.order or default_order(graph, len(ranges))
    check_order(order, graph, len(ranges))
    mod = graph.module
    call_nodes = {name: graph.call_node(name) for name in graph.names}
    consts = {n: _fetch_attr(mod, n.target) for n in mod.graph.nodes if n.op == "get_attr"}
    placeholders = [n for n in mod.graph.nodes if n.op == "placeholder"]
    output_value = next(n for n in mod.graph.nodes if n.op == "output").args[0]
    envs: list[dict] = [dict() for _ in ranges]

    bound: dict = {}  # what the tasks run on: each nano-batch's input views and the output

    def bind(inputs, new_out: torch.Tensor | None) -> None:
        bound["inputs"] = inputs
        bound["views"] = [dict(zip(placeholders, nano_inputs(inputs, r0, r1) if nano_inputs else _nano_inputs(
            case.layout, inputs, r0, r1, new_out, graph.writes_output))) for r0, r1 in ranges]
        bound["out"] = new_out
        if tasks:
            plan.out = new_out

    def reset() -> None:
        if fresh_each_run:
            bound["views"] = [dict(zip(placeholders, nano_inputs(bound["inputs"], r0, r1))) for r0, r1 in ranges]
        for env, initial in zip(envs, bound["views"]):
            env.clear()
            env.update(initial)

    tasks: list[Task] = []
    bind(case.inputs, out)

    stream_of = {(s.op, s.nano): s.stream for s in order}
    index_of = {(s.op, s.nano): i for i, s in enumerate(order)}
    drops = _drop_after(order, graph, call_nodes, stream_of, output_value)
    for i, step in enumerate(order):
        node = call_nodes[step.op]
        env, r = envs[step.nano], ranges[step.nano]
        single = isinstance(output_value, fx.Node)
        join = (bound, case.layout, r, output_value) if single and out is not None and not graph.writes_output \
            and _produces(node, output_value) else None
        waits = tuple(sorted({index_of[(d, step.nano)] for d in graph.op(step.op).deps
                              if stream_of[(d, step.nano)] != step.stream}))
        fn = _task_fn(mod, node, env, consts, drops.get(i, ()), join)
        enter = case.around(step.op, step.nano, *r) if case.around is not None else None
        tasks.append(Task(op=step.op, nano=step.nano, stream=step.stream, waits=waits,
                          fn=fn if enter is None else _inside(fn, enter)))
    plan = Plan(schedule=schedule, tasks=tasks, out=out, ranges=ranges, join_copies=not graph.writes_output,
                envs=envs, reset=reset, bind=bind)
    plan.outputs = lambda b: _plain(fx.node.map_arg(output_value, lambda n: _loader(n, envs[b], consts)()))
    return plan


def _plain(value):
    """fx hands a list output back as its immutable_list: the caller gets a plain list."""
    return list(value) if isinstance(value, list) else value


def _nano_inputs(layout, inputs, r0: int, r1: int, out: torch.Tensor, writes_output: bool):
    views = layout.split_inputs(inputs, r0, r1)
    return (*views, layout.output_view(out, r0, r1)) if writes_output else views


def _task_fn(mod, node: fx.Node, env: dict, consts: dict, drop: tuple, join):
    """Backends run tasks under torch.no_grad() (grad mode is per thread)."""
    forward = getattr(mod, node.target).forward  # skips nn.Module.__call__'s hook machinery
    loaders = [_loader(a, env, consts) for a in node.args]
    if join is None:
        def fn() -> None:
            env[node] = forward(*[load() for load in loaders])
            for n in drop:
                del env[n]
        return fn
    bound, layout, (r0, r1), value = join
    load_value = _loader(value, env, consts)

    def fn_with_copy() -> None:
        env[node] = forward(*[load() for load in loaders])
        layout.output_view(bound["out"], r0, r1).copy_(load_value())
        for n in drop:
            del env[n]
    return fn_with_copy


def _inside(fn: Callable[[], None], enter: Callable[[], object]) -> Callable[[], None]:
    """The task run inside the context manager `enter()` makes (Case.around)."""
    def run() -> None:
        with enter():
            fn()
    return run


def _loader(a, env: dict, consts: dict) -> Callable[[], object]:
    """A closure fetching one argument: a value of this nano-batch, a parameter, or a constant."""
    if not isinstance(a, fx.Node):
        return lambda: a
    if a in consts:
        value = consts[a]
        return lambda: value
    if a.op == "call_function" and a.target is operator.getitem:
        src, idx = a.args
        return lambda: env[src][idx]
    return lambda: env[a]


def _drop_after(order, graph: OpGraph, call_nodes, stream_of, output_value) -> dict[int, tuple]:
    """Task index -> values it may drop: producers on its stream, all of whose readers share it."""
    readers: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(order):
        for d in graph.op(s.op).deps:
            readers.setdefault((d, s.nano), []).append(i)
    drops: dict[int, list] = {}
    for (op, nano), idx in readers.items():
        same_stream = all(order[i].stream == stream_of[(op, nano)] for i in idx)
        if same_stream and not _produces(call_nodes[op], output_value):
            drops.setdefault(max(idx), []).append(call_nodes[op])
    return {i: tuple(v) for i, v in drops.items()}


def _produces(node: fx.Node, value) -> bool:
    """Whether `node` makes (part of) the graph's output `value`, a node or a tuple of them."""
    if isinstance(value, (tuple, list)):
        return any(_produces(node, v) for v in value)
    while isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.getitem:
        value = value.args[0]
    return value is node


def _fetch_attr(mod: torch.nn.Module, target: str):
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

