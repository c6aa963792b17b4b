"""FLOP and byte counts of a run, from torch's dispatcher (no model knowledge needed)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

_ATEN = torch.ops.aten
COPY_OPS = {_ATEN.copy_.default, _ATEN.cat.default, _ATEN.clone.default, _ATEN._to_copy.default,
            _ATEN.index_put_.default, _ATEN.index_put.default, _ATEN.index.Tensor, _ATEN.stack.default}


class BytesCounterMode(TorchDispatchMode):
    """Counts the least bytes a run must move: every tensor it did not create, read once, plus
    every output it returns. Also records whether any op did arithmetic (else it is a copy op)
    and the bytes the explicit copy ops moved."""

    def __init__(self) -> None:
        super().__init__()
        self.created: set[int] = set()
        self.external: dict[tuple[int, int], int] = {}
        self.only_copies = True
        self.copy_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and _storage_ptr(t) not in self.created:
                self.external[(t.data_ptr(), t.nbytes)] = t.nbytes
        out = func(*args, **kwargs)
        if func in COPY_OPS:
            self.copy_bytes += sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        elif not _is_view(func):
            self.only_copies = False
        aliased = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage_ptr(t) not in aliased:
                self.created.add(_storage_ptr(t))
        return out

    @property
    def external_bytes(self) -> int:
        return sum(self.external.values())


@dataclass(frozen=True, kw_only=True, slots=True)
class Counts:
    flops: float
    bytes: float
    only_copies: bool
    copy_bytes: int


def count(fn, *args) -> tuple[object, Counts]:
    """Run fn(*args) once under both counters; bytes = external reads + returned outputs."""
    flop_mode = FlopCounterMode(display=False)
    byte_mode = BytesCounterMode()
    with torch.no_grad(), flop_mode, byte_mode:
        out = fn(*args)
    out_bytes = sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    counts = Counts(flops=float(flop_mode.get_total_flops()), bytes=float(byte_mode.external_bytes + out_bytes),
                    only_copies=byte_mode.only_copies, copy_bytes=byte_mode.copy_bytes)
    return out, counts


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


_FREE = {"aten::empty", "aten::empty_like", "aten::zeros", "aten::zeros_like", "aten::full", "aten::arange",
         "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty_strided"}


def _is_view(func) -> bool:
    """View and allocation ops move no data."""
    return func.is_view or func._schema.name in _FREE
