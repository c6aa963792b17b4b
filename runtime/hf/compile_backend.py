"""Op-level schedules on unchanged models through torch.compile (Hugging Face models included).

    model = compile_with_schedules(hf_model, smap)      # or a policy (BatchLayout) -> Schedule
    logits = model(input_ids=ids, **cache_kwargs(model, static_cache), use_cache=True).logits

Dynamo hands the backend one FX graph of the model, whose nodes carry the module they came
from (`nn_module_stack`). The graph is cut into ops at the innermost module boundaries (per
decoder layer: the norms, q/k/v projections, the attention itself, o projection, the MLP's
projections) by the same `graph.cut` the torch.fx path uses, and each live batch runs under the
schedule the map (or policy) picks: nano-batches are row views of the batched inputs and of the
static KV cache, on the schedule's streams, ops in its order. Batch sizes must be symbolic in
the graph, so dim 0 of the token inputs and of every static cache tensor is marked dynamic
before each call: a nano-batch then runs the same graph with its own row count. Values that are
not batched but are updated in place (a static cache's position counter) are given to each
nano-batch as a copy, and the original advanced once, as one unsplit call would.

A model dynamo cannot capture in one graph (a graph break: data-dependent control flow, such as
Mixtral's expert routing in transformers) runs at layer granularity instead (`apply_schedules`),
with one WARNING naming why.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..batch import BatchLayout
from ..case import Case
from ..graph import OpGraph, cut, writes_input
from ..plan import build_plan
from ..schedule import Schedule
from ..serving import ScheduledCalls, as_chooser
from ..shapes import ShapeLog
from .compat import cache_arg, check_transformers, whole_graph_note
from .layers import ScheduledDecoderLayer, apply_schedules, decoder_layers

log = logging.getLogger("dynaflow")
LIVE = threading.local()  # the context length of the call in flight, set by the wrapper


def module_path(node: fx.Node) -> str | None:
    """The innermost module a dynamo node came from, as a dotted path below the model."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _ROOT.sub("", path) or "model"


# How dynamo names the model it traces: `L['self']`, or `L['args'][0]` when its forward is wrapped
# (transformers 5.24's deprecated-argument decorator); what follows is the path below the model.
_ROOT = re.compile(r"^L(\[[^\]]*\])+\.?")


_HEAVY = {torch.nn.functional.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.softmax,
          torch.nn.functional.softmax, "matmul", "bmm", "softmax"}


def op_keys(gm: fx.GraphModule) -> Callable[[fx.Node], str | None]:
    """Which op a dynamo node starts: its innermost module when that is a leaf (a projection, a
    norm, an activation); in a module with children (an attention block, the model) only the
    heavy work (attention, matmul, softmax) starts an op, and the rest (reshapes, rotary
    embedding, the cache update) is glue that joins the op producing its input."""
    paths = {p for n in gm.graph.nodes if (p := module_path(n)) is not None}
    parents = {p for p in paths if any(q.startswith(p + ".") for q in paths)}

    def key_of(node: fx.Node) -> str | None:
        path = module_path(node)
        if path is None:
            return None
        if path not in parents or node.target in _HEAVY:
            return path
        return None

    return key_of


class GraphRunner:
    """Runs one dynamo graph under the schedule chosen for each call's batch."""

    def __init__(self, gm: fx.GraphModule, chooser, shapes: ShapeLog | None = None) -> None:
        self.gm = gm
        self.calls = ScheduledCalls(chooser, shapes=shapes)
        self.chooser, self.shapes, self.plans = self.calls.chooser, self.calls.shapes, self.calls.plans
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.kinds = _input_kinds(placeholders)
        self.varying = _symbolic_inputs(placeholders)  # the inputs whose shapes (or values) can change per call
        self.graph: OpGraph = cut(gm, op_keys(gm))

    @property
    def splittable(self) -> bool:
        return "rows" in self.kinds

    def __call__(self, *args):
        batched = [a for a, k in zip(args, self.kinds) if k == "rows"]
        rows_input = next((a for a in batched if a.dim() in (2, 3)), batched[0])  # input_ids or embeddings
        rows = rows_input.shape[0]
        tokens = rows_input.shape[1] if rows_input.dim() in (2, 3) else 1
        layout = BatchLayout(request_tokens=(tokens,) * rows,
                             request_kinds=("decode" if tokens == 1 else "prefill",) * rows,
                             input_axes=(), kinds=("decode", "prefill"))
        schedule = self.calls.pick(layout, getattr(LIVE, "context_len", 0))  # counts the shape too
        if getattr(LIVE, "unsplit", False) or (schedule.num_nano < 2 and len(schedule.streams) < 2):
            return self.gm(*args)
        shape = (layout.request_tokens, tuple(tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else args[i]
                                              for i in self.varying))
        return self.calls.run(schedule, shape, rows_input.device, lambda: self._prepare(schedule, layout, args), args,
                              finish=_finish)

    def _prepare(self, schedule: Schedule, layout: BatchLayout, args):
        state: dict[str, Any] = {"copies": {}}

        def nano_inputs(inputs, r0: int, r1: int) -> tuple:
            return nano_args(inputs, self.kinds, r0, r1, state["copies"])

        case = Case(model=self.gm, inputs=tuple(args), layout=layout)
        try:
            plan = build_plan(self.graph, case, schedule, None, nano_inputs=nano_inputs)
        except ValueError as e:  # an order made for another graph of the model (e.g. prefill's, not decode's)
            if not schedule.order:
                raise
            log.warning("schedule %s: its order does not fit this graph (%s); its splits and streams run in the "
                        "graph's own order", schedule.label, e)
            plan = build_plan(self.graph, case, dataclasses.replace(schedule, order=()), None, nano_inputs=nano_inputs)

        bind_fx = plan.bind

        def bind(inputs) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
            """The call's inputs; returns each input written in place with its per-nano-batch copies."""
            state["copies"] = {}
            bind_fx(inputs, None)
            return list(state["copies"].values())

        def unbind() -> None:  # the cached plan keeps no values of this call alive
            for env in plan.envs:
                env.clear()

        plan.bind, plan.unbind = bind, unbind
        return plan


def _finish(plan, copies: list):
    """After the run (on a GPU it ends with every stream joined into the current one, so the copies
    follow it): every nano-batch advanced its copy alike, so the original advances once, as one
    unsplit call would; the nano-batches' outputs joined by rows."""
    for original, per_nano in copies:
        original.copy_(per_nano[0])
    return join_outputs([plan.outputs(b) for b in range(len(plan.ranges))], [r1 - r0 for r0, r1 in plan.ranges])


def _input_kinds(placeholders: list[fx.Node]) -> list[str]:
    """Per graph input: "rows" (a tensor batched on dim 0), "batch_int" (the batch size itself, a
    symbolic int), "mutated" (not batched, updated in place by the graph), or "whole"."""
    values = [n.meta.get("example_value") for n in placeholders]
    batch = None
    for v in values:  # the batch symbol: dim 0 of the first non-parameter tensor of 2+ dims
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.dim() >= 2 \
                and isinstance(v.shape[0], torch.SymInt):
            batch = v.shape[0].node.expr
            break
    mutated = _mutated_inputs(placeholders)
    kinds = []
    for n, v in zip(placeholders, values):
        if batch is not None and isinstance(v, torch.SymInt) and v.node.expr == batch:
            kinds.append("batch_int")
        elif batch is not None and isinstance(v, torch.Tensor) and v.dim() >= 1 \
                and isinstance(v.shape[0], torch.SymInt) and v.shape[0].node.expr == batch:
            kinds.append("rows")
        else:
            kinds.append("mutated" if n in mutated else "whole")
    return kinds


def _symbolic_inputs(placeholders: list[fx.Node]) -> list[int]:
    """Indices of the inputs dynamo left symbolic (a size it did not specialise): every other
    input's shape is pinned by the graph's guards, so the plan cache need not look at it."""
    def symbolic(v) -> bool:
        return isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor)
                                               and any(isinstance(d, torch.SymInt) for d in v.shape))
    return [i for i, n in enumerate(placeholders) if symbolic(n.meta.get("example_value"))]


def _mutated_inputs(placeholders: list[fx.Node]) -> set[fx.Node]:
    """Inputs an in-place op (`x.add_(...)`, `x.index_copy_(...)`) writes."""
    return {ph for ph in placeholders if any(writes_input(u) and u.args[0] is ph for u in ph.users)}


def nano_args(inputs, kinds: list[str], r0: int, r1: int, copies: dict | None = None) -> tuple:
    """One nano-batch's graph inputs: rows r0:r1 of batched tensors, its row count for the batch
    size, a fresh copy of each unbatched input the graph writes (recorded in `copies`, by the
    original's id, when given), the rest whole."""
    out = []
    for a, kind in zip(inputs, kinds):
        if kind == "rows":
            out.append(a[r0:r1])
        elif kind == "batch_int":
            out.append(r1 - r0)
        elif kind == "mutated":
            copy = a.clone()
            if copies is not None:
                copies.setdefault(id(a), (a, []))[1].append(copy)
            out.append(copy)
        else:
            out.append(a)
    return tuple(out)


def join_outputs(outputs: list, rows: list[int]):
    """Each nano-batch's outputs, batched ones concatenated by rows; the rest from nano-batch 0."""
    first = outputs[0]
    if isinstance(first, (tuple, list)):
        return type(first)(join_outputs([o[i] for o in outputs], rows) for i in range(len(first)))
    if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == rows[0] \
            and all(isinstance(o, torch.Tensor) and o.shape[0] == r for o, r in zip(outputs, rows)):
        return torch.cat(outputs)
    return first


def schedule_backend(chooser, *, shapes: ShapeLog | None = None, runners: list | None = None) -> Callable:
    """A torch.compile backend running each graph under `chooser` (a ScheduleMap or a policy)."""
    chooser = as_chooser(chooser, shapes)  # one chooser and shape log for every graph dynamo makes

    def backend(gm: fx.GraphModule, example_inputs):
        runner = GraphRunner(gm, chooser)
        if runners is not None:
            runners.append(runner)
        if not runner.splittable:
            log.warning("a compiled graph of %d ops has no batch dimension dynamo kept symbolic; it runs unsplit",
                        len(runner.graph.ops))
            return gm.forward
        return runner

    return backend


class CompiledWithSchedules(nn.Module):
    """`model` compiled with the schedule backend. Each call marks the batch dims dynamic and
    passes the live context length to the backend. The first call runs unsplit and counts
    dynamo's graph breaks: with none, later calls run at op granularity (`runners`: one per graph
    dynamo made, `recompiles` counts them); with some, the decoder layers run at layer
    granularity (`apply_schedules`) and one WARNING names why (`fallback`)."""

    def __init__(self, model: nn.Module, chooser) -> None:
        super().__init__()
        self.model, self.chooser = model, as_chooser(chooser)  # one chooser (and shape log) for graphs and layers
        self.runners: list[GraphRunner] = []
        self.compiled = torch.compile(model, backend=schedule_backend(self.chooser, runners=self.runners))
        self._layers: nn.ModuleList | None = None  # the decoder layers, found once at the fallback
        self.fallback: str | None = None
        self._checked = False

    def __getattr__(self, name: str):  # the wrapped model's attributes (dtype, config, device, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def recompiles(self) -> int:
        return max(0, len(self.runners) - 1)

    @property
    def unscheduled(self) -> nn.Module:
        return self._modules["model"]

    def forward(self, *args, **kwargs):
        cache = kwargs[name] if (name := cache_arg(kwargs)) else None
        if self.fallback is not None:
            self._wrap_layers()
            return self.model(*args, **kwargs)
        for t in _batched_inputs(args, kwargs, cache):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        LIVE.context_len = int(cache.get_seq_length()) if cache is not None else 0
        if self._checked:
            return self.compiled(*args, **kwargs)
        from torch._dynamo.utils import counters

        counters["graph_break"].clear()
        LIVE.unsplit = True
        try:
            out = self.compiled(*args, **kwargs)
        finally:
            LIVE.unsplit = False
        self._checked = True
        breaks = sorted(counters["graph_break"])
        if breaks or len(self.runners) != 1:
            self.fallback = "; ".join(breaks[:3]) or (
                f"{len(self.runners)} graphs for one call" if self.runners else
                "dynamo ran it without compiling (its recompile limit for this function was reached)")
            note = whole_graph_note() if breaks else None
            log.warning("%s cannot be captured in one graph (graph break: %s)%s; its decoder layers run at layer "
                        "granularity instead", type(self.model).__name__, self.fallback, f" ({note})" if note else "")
            self._wrap_layers()
        return out

    def _wrap_layers(self) -> None:
        """At layer granularity: the model's decoder layers answered by this chooser (wrapped
        again if they were unwrapped, or wrapped for another chooser, since)."""
        if self._layers is None:  # the same ModuleList whether its layers are wrapped or not
            self._layers = decoder_layers(self.model)
        first = self._layers[0]
        if not (isinstance(first, ScheduledDecoderLayer) and first.chooser is self.chooser):
            apply_schedules(self.model, self.chooser)


def _batched_inputs(args, kwargs, cache):
    for v in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            yield v
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def compile_with_schedules(model: nn.Module, chooser) -> CompiledWithSchedules:
    """`model`, unchanged, compiled so that each call runs under the schedule `chooser` picks
    for its batch, at op granularity (layer granularity where dynamo cannot capture it whole)."""
    check_transformers()
    return CompiledWithSchedules(model, chooser)
