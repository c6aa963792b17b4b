"""A `Case`: what the runtime runs a schedule on. The core's one input type; whatever builds one
from a model spec (workload presets, `hf:` architectures, a user's `module:function`) lives above."""
from __future__ import annotations

from dataclasses import dataclass
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import nn

from .batch import BatchLayout


@dataclass(kw_only=True, slots=True)
class Case:
    """A model ready to run: module, inputs (dim 0 batched per layout), and the layout."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    layout: BatchLayout
    name: str = "model"
    # A model cut elsewhere (a dynamo graph): its ops, each nano-batch's inputs, and how the
    # nano-batches' outputs join into the plan's output. None: torch.fx traces `model`.
    graph: Any = None
    nano_inputs: Callable[[tuple, int, int], tuple] | None = None
    gather: Callable[[Any], None] | None = None
    # What each task runs inside: around(op, nano, r0, r1) gives, for op `op` of the plan's
    # nano-batch `nano` (its index: nano-batches of one plan never share one) on requests [r0, r1),
    # a factory of the context manager its task runs in (vLLM's attention ops read their
    # nano-batch's metadata from a forward context), or None for a bare task. None: every task bare.
    around: Callable[[str, int, int, int], Callable[[], AbstractContextManager] | None] | None = None
    # What a sequential schedule runs instead of the op plan: the call serving makes for one
    # (vLLM's own compiled graph), so that candidates are timed against it. None: the op plan.
    sequential: Callable[..., Any] | None = None
    # This rank's tensor-parallel group (runtime.parallel.Parallel): measurements agree across
    # ranks on when to stop, and peaks are measured one rank at a time. None: one device.
    parallel: Any = None

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def device(self) -> torch.device:
        """Where the case runs: its first tensor input's device."""
        return next(t.device for t in self.inputs if isinstance(t, torch.Tensor))
