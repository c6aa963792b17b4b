"""One vLLM model graph, each forward step run under the schedule chosen for its batch.

vLLM hands its compilation backend one FX graph of the whole model, with the step's token count
symbolic: `input_ids` and `positions` are [num_tokens], and the graph's sizes follow them. A
step's batch is read from the forward context (the attention metadata's `query_start_loc`: each
request's tokens, a decode being one, a prefill chunk several). A nano-batch is a range of the
step's requests: its token rows of every batched input, its own token count for the graph's
size inputs, and, while each of its attention and KV-cache-update ops runs, the forward context
showing that nano-batch's attention metadata and slot mappings. The metadata is vLLM's own: the
step's CommonAttentionMetadata per attention group, split by vLLM's `split_attn_metadata` and
built by the group's own builder at the nano-batch's slot (hooks.StepAttention), so any attention
backend vLLM has is cut the same way. The nano-batches' outputs are joined by rows. A sequential
step runs vLLM's own compiled graph.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch
import torch.fx as fx

from .. import validate
from ..batch import BatchLayout
from ..case import Case
from ..devices import device_type
from ..graph import OpGraph, cut
from ..hf.compile_backend import join_outputs, op_keys
from ..plan import Plan, build_plan
from ..schedule import Schedule
from ..serving import ScheduledCalls
from . import hooks

log = logging.getLogger("vllm.dynaflow")


def token_kinds(placeholders: list[fx.Node]) -> list[str]:
    """Per graph input: "rows" (a tensor whose dim 0 is a symbolic size: the step's tokens),
    "size" (a symbolic int that is such a dim 0: the token count), or "whole" (weights, caches,
    the layer-name objects of the attention ops)."""
    values = [n.meta.get("example_value") for n in placeholders]
    sizes = {v.shape[0].node.expr for v in values
             if isinstance(v, torch.Tensor) and v.dim() >= 1 and isinstance(v.shape[0], torch.SymInt)}
    kinds = []
    for v in values:
        if isinstance(v, torch.SymInt) and v.node.expr in sizes:
            kinds.append("size")
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and isinstance(v.shape[0], torch.SymInt) \
                and v.shape[0].node.expr in sizes:
            kinds.append("rows")
        else:
            kinds.append("whole")
    return kinds


def ops_calling(graph: OpGraph, test: Callable[[Any], bool]) -> set[str]:
    """The ops whose code calls a target `test` accepts."""
    found = set()
    for name in graph.names:
        sub = getattr(graph.module, graph.targets[name])
        if any(n.op == "call_function" and test(n.target) for n in sub.graph.nodes):
            found.add(name)
    return found


class StepRunner:
    """Runs one vLLM graph per forward step: sequential through `sequential` (vLLM's own compiled
    callable), split under the chosen schedule otherwise."""

    def __init__(self, gm: fx.GraphModule, sequential: Callable, chooser, *, dtype: torch.dtype) -> None:
        self.gm, self.sequential, self.dtype = gm, sequential, dtype
        self.calls = ScheduledCalls(chooser)
        self.shapes = self.calls.shapes
        self.kinds = token_kinds([n for n in gm.graph.nodes if n.op == "placeholder"])
        self.graph: OpGraph = cut(gm, op_keys(gm))
        self.context_ops = ops_calling(self.graph, hooks.reads_context)  # attention, KV-cache writes
        self.kernel_ops = ops_calling(self.graph, hooks.is_vllm_kernel)  # on the CPU: one thread at a time
        self.said: set[str] = set()
        self.steps = {"split": 0, "sequential": 0}
        self.cost_s = {"deciding": 0.0, "sequential_steps": 0.0}  # over the sequential steps: the plugin's share
        self._t0 = 0.0
        self._layouts: dict[tuple[int, ...], BatchLayout] = {}  # per query_start_loc: the step's layout
        self.device: torch.device | None = None  # the device of the steps seen
        # capture(args, step, metadata, slots, layout, context) -> None, or keep(output) for a step kept to tune on
        self.capture: Callable[..., Callable[[Any], None] | None] | None = None

    def say_once(self, why: str, *, what: str = "a step runs sequential") -> None:
        if why not in self.said:
            self.said.add(why)
            log.warning("dynaflow: %s: %s", what, why)

    def __call__(self, *args):
        self._t0 = time.perf_counter()
        metadata, slots = hooks.step_metadata()
        if metadata is None:  # a profiling or warm-up run: no batch to schedule
            return self.sequential(*args)
        self.device = self.device or next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        step = hooks.step_attention(metadata)
        why = step if isinstance(step, str) else self._why_not(step.starts, args)
        if why is not None:
            self.say_once(why)
            return self._sequential(args)
        context = step.context_len
        layout = self.layout_of(step.starts)
        if self.capture is not None:  # tuning (tuner/vllm_engine.py): a step of the wanted shape is kept, and runs as vLLM's
            keep = self.capture(args, step, metadata, slots, layout, context)
            if keep is not None:
                out = self._sequential(args)
                keep(out)
                return out
        schedule = self.calls.pick(layout, context)
        if schedule.num_nano < 2 and len(schedule.streams) < 2:
            return self._sequential(args)
        try:
            out = self.calls.run(schedule, (layout.request_tokens,), self.device,
                                 lambda: self._prepare(schedule, layout, args), args, step, slots,
                                 finish=_joiner(layout))
        except ValueError as e:  # the schedule breaks a rule of this batch (a cut inside a request, ...)
            self.say_once(f"schedule {validate.short(schedule.label)} does not fit this step ({e})")
            return self._sequential(args)
        self.steps["split"] += 1
        return out

    def _sequential(self, args):
        """vLLM's own graph; the time this step spent deciding so is the plugin's cost to a sequential step."""
        t1 = time.perf_counter()
        out = self.sequential(*args)
        self.steps["sequential"] += 1
        self.cost_s["deciding"] += t1 - self._t0
        self.cost_s["sequential_steps"] += time.perf_counter() - self._t0
        return out

    def _why_not(self, starts: tuple[int, ...], args) -> str | None:
        if "rows" not in self.kinds:
            return "vLLM's graph has no input batched by tokens"
        rows = next(a.shape[0] for a, k in zip(args, self.kinds) if k == "rows")
        if rows != starts[-1]:
            return f"the step's inputs hold {rows} token rows for {starts[-1]} scheduled tokens (padding)"
        return None

    def layout_of(self, starts: tuple[int, ...]) -> BatchLayout:
        """The step's batch from its query_start_loc: one request per range, a decode being 1 token."""
        layout = self._layouts.get(starts)
        if layout is None:
            if len(self._layouts) >= 4096:  # live shapes are few; bound the cache anyway
                self._layouts.clear()
            tokens = [b - a for a, b in zip(starts, starts[1:])]
            layout = self._layouts[starts] = BatchLayout(
                request_tokens=tuple(tokens), request_kinds=tuple("decode" if t == 1 else "prefill" for t in tokens),
                input_axes=(), kinds=("decode", "prefill"))
        return layout

    def case(self, args, layout: BatchLayout, nano_metadata: Callable[[int, int, int], Any], *,
             model: Callable | None = None) -> Case:
        """A step as the runtime's Case: each nano-batch's token rows of the batched inputs and its
        token count for the graph's sizes, its attention and KV-cache ops inside the forward
        context `nano_metadata(nano, r0, r1)` makes (hooks.nano_context or a replayed context) for
        the plan's nano-batch `nano` on requests [r0, r1), vLLM's own CPU kernels entered one thread
        at a time. `model`: what runs the whole step (the tuner's reference); the graph by default."""
        kinds = self.kinds

        def nano_inputs(inputs, r0: int, r1: int) -> tuple:
            tok = layout.slices(r0, r1)["tokens"]
            return tuple(a[tok] if k == "rows" else tok.stop - tok.start if k == "size" else a
                         for a, k in zip(inputs, kinds))

        on_cpu = self.device is None or not device_type(self.device).accelerator

        def around(op: str, nano: int, r0: int, r1: int):
            if op in self.context_ops:
                return lambda: nano_metadata(nano, r0, r1)
            return hooks.kernels_in_turn if on_cpu and op in self.kernel_ops else None

        return Case(model=model or self.gm, inputs=tuple(args), layout=layout, name="vllm", graph=self.graph,
                    nano_inputs=nano_inputs, around=around)

    def _prepare(self, schedule: Schedule, layout: BatchLayout, args) -> Plan:
        state: dict[int, tuple] = {}  # this step's (metadata, slot mappings) per nano-batch, made at bind
        case = self.case(args, layout, lambda nano, r0, r1: hooks.nano_context(*state[nano]))
        try:
            plan = build_plan(self.graph, case, schedule, None, nano_inputs=case.nano_inputs)
        except ValueError as e:  # an order made for another graph (a record tuned on the hf: model)
            if not schedule.order:
                raise
            self.say_once(f"schedule {validate.short(schedule.label)}'s op order does not fit vLLM's graph ({e}); "
                          "its splits and streams run in the graph's own order", what="a schedule runs in part")
            plan = build_plan(self.graph, case, dataclasses.replace(schedule, order=()), None,
                              nano_inputs=case.nano_inputs)
        bind_fx = plan.bind

        def bind(inputs, step: hooks.StepAttention, slots) -> None:
            state.update({b: (step.nano(b, r0, r1), hooks.nano_slots(slots, step.tokens(r0, r1)))
                          for b, (r0, r1) in enumerate(plan.ranges)})
            bind_fx(inputs, None)

        def unbind() -> None:  # the cached plan keeps no values of this step alive
            state.clear()
            for env in plan.envs:
                env.clear()

        plan.bind, plan.unbind = bind, unbind
        return plan


def _joiner(layout: BatchLayout) -> Callable[[Plan, Any], Any]:
    """The nano-batches' outputs joined by token rows (a tuple output element by element)."""
    def join(plan: Plan, _bound):
        rows = [sum(layout.request_tokens[r0:r1]) for r0, r1 in plan.ranges]
        return join_outputs([plan.outputs(b) for b in range(len(plan.ranges))], rows)
    return join
