"""Dual-batch overlap: two nano-batches, each on its own stream, interleaved by a template.

What varies: the split point (balanced, or offset by whole split steps) and the overlap
template: "op-major" (each op of both nano-batches back to back), "stagger-k" (nano-batch 1
trails by k ops), or "by-resource" (compute ops on one stream, the rest on the other).
"""
from dynaflow.runtime import Schedule, StreamSpec
from dynaflow.runtime.graph import Resource

from .base import SpaceContext, Trial, splits_from_weights, staggered_order

name = "dbo"
TEMPLATES = ("op-major", "stagger-1", "stagger-2", "stagger-4", "by-resource")
MAX_OFFSET = 8


def suggest(trial: Trial, ctx: SpaceContext) -> Schedule:
    offset = trial.suggest_int("offset_steps", -MAX_OFFSET, MAX_OFFSET)
    template = trial.suggest_categorical("template", list(TEMPLATES))
    sizes = splits_from_weights(ctx, [2 * MAX_OFFSET + offset + 1, 2 * MAX_OFFSET - offset + 1])
    if not sizes:  # a batch too small to split: DBO degenerates to the baseline
        return Schedule(label="dbo:unsplittable")
    stagger = 0 if template in ("op-major", "by-resource") else int(template.split("-")[1])
    if template == "by-resource":
        def stream_of(op, b):
            return 0 if ctx.graph.op(op).resource is Resource.COMPUTE else 1
    else:
        def stream_of(op, b):
            return b
    order = staggered_order(ctx, 2, stagger, stream_of)
    return Schedule(split_sizes=sizes, streams=(StreamSpec(), StreamSpec()), order=order,
                    label=f"dbo:{template}:{sizes[0]}/{sizes[1]}")
