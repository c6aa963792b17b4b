"""What every search space gets, and the schedule-building helpers they share.

A search space is a define-by-run function (trial, ctx) -> Schedule that never proposes an
infeasible schedule: splits are snapped to request boundaries, SM shares are whole partition
steps that fit the device, and orders are built from templates that respect dependencies.
`trial` only needs optuna's suggest_* methods, so spaces are testable with a fixed trial.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from dynaflow.runtime import BatchLayout, Hardware, OpGraph, Step, StreamSpec, plan


class Trial(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_categorical(self, name: str, choices): ...


@dataclass(frozen=True, kw_only=True, slots=True)
class SpaceContext:
    hardware: Hardware
    graph: OpGraph
    layout: BatchLayout

    @property
    def sm_granularity(self) -> int:
        """SMs per green-context partition step, as the hardware's driver reported; threads on CPU."""
        return self.hardware.partition_step

    @property
    def sm_steps(self) -> int:
        """Partition steps the device holds: the groups one split of its SMs gives."""
        return self.hardware.partition_groups

    @property
    def split_step(self) -> int:
        """Decode requests per split step: keeps nano-batches GEMM-friendly on big batches."""
        n = self.layout.request_kinds.count("decode")
        return 8 if n >= 64 else 4 if n >= 16 else 1

    def boundaries(self) -> list[int]:
        """Request indices where a nano-batch may end: every split step, every non-decode request."""
        kinds, n = self.layout.request_kinds, self.layout.num_requests
        cuts = {i for i in range(0, n + 1) if i % self.split_step == 0 or i == n or
                (i > 0 and kinds[i - 1] != "decode")}
        return sorted(cuts)


def splits_from_weights(ctx: SpaceContext, weights: list[int]) -> tuple[int, ...]:
    """Nano-batch sizes (in requests) whose token counts follow `weights`, snapped to boundaries;
    cuts that snap onto each other merge their nano-batches."""
    fractions = [c / sum(weights) for c in itertools.accumulate(weights)][:-1]
    cuts = [0]
    for at in ctx.layout.nearest_cuts(fractions, ctx.boundaries()):
        if cuts[-1] < at < ctx.layout.num_requests:
            cuts.append(at)
    cuts.append(ctx.layout.num_requests)
    sizes = tuple(b - a for a, b in zip(cuts, cuts[1:]))
    return sizes if len(sizes) > 1 else ()


def staggered_order(ctx: SpaceContext, num_nano: int, stagger: int, stream_of) -> tuple[Step, ...]:
    """Nano-batch b issues op j at slot j + b * stagger (runtime.plan.staggered_order)."""
    return plan.staggered_order(ctx.graph, num_nano, stagger, stream_of)


def sm_shares(trial: Trial, ctx: SpaceContext, num_streams: int) -> tuple[StreamSpec, ...]:
    """Per-stream SM shares in whole partition steps, scaled down to fit the device if needed."""
    step, total_steps = ctx.sm_granularity, ctx.sm_steps
    feasible = 1 < num_streams <= total_steps
    if not feasible or not trial.suggest_categorical("partition", [False, True]):
        return tuple(StreamSpec() for _ in range(num_streams))
    want = [trial.suggest_int(f"sm_steps_{i}", 1, total_steps - num_streams + 1) for i in range(num_streams)]
    if sum(want) > total_steps:
        want = _fit(want, total_steps)
    return tuple(StreamSpec(sm_share=w * step) for w in want)


def _fit(want: list[int], total: int) -> list[int]:
    scaled = [max(1, w * total // sum(want)) for w in want]
    while sum(scaled) > total:  # the max(1, ...) floor can overshoot by a step or two
        scaled[scaled.index(max(scaled))] -= 1
    return scaled
