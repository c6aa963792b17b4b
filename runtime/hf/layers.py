"""Hugging Face transformers models: decoder layers run under the schedule of each live batch.

    apply_schedules(model, smap)      # wraps model.model.layers[i]; transformers' code untouched
    remove_schedules(model)           # puts the original layers back

Each decoder layer runs as one op per nano-batch (the batch's rows), on the streams the
schedule gives its nano-batches: dual-batch overlap at layer granularity. Tensors batched on
dim 0 are passed as row views; a static KV cache is passed as a view of its rows, so every
nano-batch writes its own rows in place. A cache that cannot be viewed by rows (a dynamic
cache, or a static one not yet allocated: call `cache.early_initialization(...)` at start-up)
makes that call run unsplit, and the reason is logged once. transformers is never imported.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn

from ..batch import BatchLayout
from ..plan import Plan, Task
from ..schedule import Schedule
from ..serving import ScheduledCalls, as_chooser
from ..shapes import ShapeLog
from .compat import cache_arg, check_transformers

log = logging.getLogger("dynaflow")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (`model.model.layers` in Llama, Qwen2, Mixtral, ...)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                all(type(m).__name__.endswith("DecoderLayer") or isinstance(m, ScheduledDecoderLayer) for m in module):
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList of *DecoderLayer modules to schedule.")


def apply_schedules(model: nn.Module, chooser: Callable[[BatchLayout], Schedule], *,
                    shapes: ShapeLog | None = None) -> nn.Module:
    """Wrap every decoder layer. Each layer call's batch shape is counted: in the map's own log
    for a ScheduleMap, else in `shapes` (one log shared by all layers; see recorded_shapes)."""
    check_transformers()
    layers = decoder_layers(model)
    chooser = as_chooser(chooser, shapes)  # one chooser, one shape log, for every layer
    for i, layer in enumerate(layers):  # a layer wrapped before is wrapped again: the new chooser answers
        inner = layer.layer if isinstance(layer, ScheduledDecoderLayer) else layer
        layers[i] = ScheduledDecoderLayer(inner, chooser)
    return model


def recorded_shapes(model: nn.Module) -> ShapeLog:
    """The shapes the scheduled decoder layers of `model` were called with."""
    for layer in decoder_layers(model):
        if isinstance(layer, ScheduledDecoderLayer):
            return layer.shapes
    raise ValueError(f"{type(model).__name__} has no scheduled decoder layers: call apply_schedules first.")


def remove_schedules(model: nn.Module) -> nn.Module:
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, ScheduledDecoderLayer):
            layers[i] = layer.layer
    return model


class ScheduledDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, chooser, *, shapes: ShapeLog | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.calls = ScheduledCalls(chooser, shapes=shapes)
        self.chooser, self.shapes, self.plans = self.calls.chooser, self.calls.shapes, self.calls.plans
        self._layouts: dict[tuple[int, int], BatchLayout] = {}
        self.split_calls = 0  # calls that ran as several nano-batches
        self._said: set[str] = set()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        rows, tokens = hidden_states.shape[:2]
        cache_name = cache_arg(kwargs)
        cache = kwargs[cache_name] if cache_name else None
        layout = self._layouts.get((rows, tokens))
        if layout is None:
            layout = self._layouts[(rows, tokens)] = BatchLayout(
                request_tokens=(tokens,) * rows, request_kinds=("decode" if tokens == 1 else "prefill",) * rows,
                input_axes=(), kinds=("decode", "prefill"))
        schedule = self.calls.pick(layout, int(cache.get_seq_length()) if cache is not None else 0)
        reason = None if schedule.num_nano > 1 else "sequential"
        if reason is None and cache is not None:
            reason = _cache_unsplittable(cache, self._layer_idx())
        if reason is not None:
            if reason != "sequential":
                self._say(reason)
                if (count := getattr(self.chooser, "ran_unsplit", None)) is not None:
                    count()  # tuned_share counts only what runs split
            return self.layer(hidden_states, *args, **kwargs)
        return self._run_split(schedule, layout, hidden_states, args, kwargs, cache_name)

    def _run_split(self, schedule: Schedule, layout: BatchLayout, hidden_states, args, kwargs, cache_name):
        cache = kwargs[cache_name] if cache_name else None
        rows, tokens = hidden_states.shape[:2]
        out = torch.empty_like(hidden_states)
        self.calls.run(schedule, (rows, tokens, out.dtype, out.device), out.device,
                       lambda: self._prepare(schedule, layout, rows), hidden_states, args, kwargs, cache_name, out)
        if cache is not None:  # every nano-batch wrote from the same position; advance it once
            _advance(cache.layers[self._layer_idx()], tokens)
        self.split_calls += 1
        return out

    def _prepare(self, schedule: Schedule, layout: BatchLayout, rows: int):
        """The plan for one (schedule, live shape): each nano-batch's rows and stream, built once;
        each call binds its tensors (the layer's arguments, the cache's name, the output)."""
        ranges = layout.request_ranges(schedule.split_unit, schedule.split_sizes)
        bound: dict = {}
        tasks = [Task(op="layer", nano=b, stream=_stream_of(schedule, b), waits=(),
                      fn=_nano_fn(self.layer, bound, rows, r0, r1)) for b, (r0, r1) in enumerate(ranges)]
        plan = Plan(schedule=schedule, tasks=tasks, out=None, ranges=ranges, join_copies=True)

        def bind(hidden, args, kwargs, cache_name, out) -> None:
            bound.update(hidden=hidden, args=args, kwargs=kwargs, cache_name=cache_name, out=out)
            plan.out = out

        plan.bind, plan.unbind = bind, bound.clear  # the call's tensors are not kept alive by the cached plan
        return plan

    def _layer_idx(self) -> int | None:
        attn = getattr(self.layer, "self_attn", None)
        return getattr(attn, "layer_idx", None)

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.warning("decoder layer %s runs unsplit: %s", self._layer_idx(), reason)


def _nano_fn(layer, bound: dict, rows: int, r0: int, r1: int):
    """Rows r0:r1 of the call bound in `bound`: views of its batched tensors and of its static cache."""
    def fn() -> None:
        kwargs = {k: _rows(v, rows, r0, r1) for k, v in bound["kwargs"].items()}
        if (name := bound["cache_name"]) is not None:  # passed on under the name the call used
            kwargs[name] = CacheRows(bound["kwargs"][name], slice(r0, r1))
        result = layer(_rows(bound["hidden"], rows, r0, r1), *(_rows(a, rows, r0, r1) for a in bound["args"]), **kwargs)
        bound["out"][r0:r1].copy_(result[0] if isinstance(result, tuple) else result)

    return fn


def _stream_of(schedule: Schedule, nano: int) -> int:
    """The stream of the nano-batch's first step in the schedule's order, else one per nano-batch."""
    for step in schedule.order:
        if step.nano == nano:
            return step.stream
    return nano % len(schedule.streams)


def _rows(value, rows: int, r0: int, r1: int):
    """Row views of batched tensors (dim 0 == the batch, at least 2 dims); others pass whole."""
    if isinstance(value, torch.Tensor):
        return value[r0:r1] if value.dim() >= 2 and value.shape[0] == rows and rows > 1 else value
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, r0, r1) for v in value)
    return value


STATIC_LAYERS = ("StaticLayer", "StaticSlidingWindowLayer")  # fixed-size tensors, written in place by rows
GROWING_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")  # concatenated: a StaticCache replaces them


def _cache_unsplittable(cache, idx: int | None) -> str | None:
    layers = getattr(cache, "layers", None)
    if idx is None or layers is None or idx >= len(layers):
        return f"a {type(cache).__name__} cannot be viewed by rows"
    kind = type(layers[idx]).__name__
    if kind in GROWING_LAYERS:
        return f"a {kind} grows by concatenation and cannot be split by rows; use a StaticCache"
    if kind not in STATIC_LAYERS:
        return f"a {kind} cache layer cannot be viewed by rows"
    if not getattr(layers[idx], "is_initialized", False):
        return "the static cache is not allocated yet; call cache.early_initialization(...) at start-up"
    return None


def _advance(layer, tokens: int) -> None:
    """Advance a static layer's position by the tokens every nano-batch wrote, once, as one
    unsplit update would have: a sliding layer counts in a Python int always and in its tensor
    only while the window was not filling up (its update's index_copy branch)."""
    if hasattr(layer, "cumulative_length_int"):
        if layer.cumulative_length_int + tokens <= layer.max_cache_len:
            layer.cumulative_length.add_(tokens)
        layer.cumulative_length_int += tokens
    else:
        layer.cumulative_length.add_(tokens)


class CacheRows:
    """Rows r0:r1 of a static cache, as one nano-batch's decoder layer sees it."""

    def __init__(self, cache, rows: slice) -> None:
        self.cache, self.rows = cache, rows

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        part = copy.copy(layer)
        part.keys, part.values = layer.keys[self.rows], layer.values[self.rows]
        part.cumulative_length = layer.cumulative_length.clone()  # advanced once, after all rows
        return part.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.cache, name)
