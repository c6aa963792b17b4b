"""FLOP and byte counts of a run, from torch's dispatcher (no model knowledge needed)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

_ATEN = torch.ops.aten
COPY_OPS = {_ATEN.copy_.default, _ATEN.cat.default, _ATEN.clone.default, _ATEN._to_copy.default,
            _ATEN.index_put_.default, _ATEN.index_put.default, _ATEN.index.Tensor, _ATEN.stack.default}


MATMULS = {_ATEN.mm.default: 0, _ATEN.bmm.default: 0, _ATEN.addmm.default: 1, _ATEN.baddbmm.default: 1}
# Reductions over the dims they are given (args[1]), else over the whole tensor.
REDUCTIONS = {"aten::sum", "aten::mean", "aten::var_mean", "aten::var", "aten::std", "aten::std_mean",
              "aten::nansum", "aten::nanmean", "aten::logsumexp", "aten::_softmax", "aten::softmax",
              "aten::_log_softmax", "aten::log_softmax", "aten::linalg_vector_norm", "aten::norm",
              "aten::cumsum", "aten::prod"}
# Norms over their trailing `normalized_shape` (args[1]): layer norm, RMS norm.
TRAILING_NORMS = {"aten::native_layer_norm", "aten::layer_norm", "aten::_fused_rms_norm", "aten::rms_norm"}


def reduction_length(func, args) -> int:
    """Terms summed into one output element by this op: the inner dimension of a matmul, the
    longer of head_dim and the key length in attention, a convolution's in-channels per group
    times its kernel size, a norm's normalised size (layer, RMS: the trailing shape; group: the
    channels per group times the spatial size), the reduced extent of a sum, mean, variance or
    softmax."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    foreign = FOREIGN_OPS.get(getattr(func, "_overloadpacket", None))
    if foreign is not None:
        return int(foreign[1](args))
    if func in MATMULS:
        return int(args[MATMULS[func]].shape[-1])
    name = func._schema.name
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        q, k = tensors[0], tensors[1]
        return int(max(q.shape[-1], k.shape[-2]))
    if "convolution" in name and len(tensors) >= 2:
        return _conv_length(tensors[1], args)
    if name in TRAILING_NORMS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return max(math.prod(int(n) for n in args[1]), 1)
    if name == "aten::native_group_norm" and len(args) >= 7:  # (input, weight, bias, N, C, HxW, group, eps)
        return max(int(args[4]) // max(int(args[6]), 1) * int(args[5]), 1)
    if name in ("aten::mv", "aten::addmv"):
        return int(tensors[0 if name == "aten::mv" else 1].shape[-1])
    if name in ("aten::dot", "aten::vdot"):
        return int(tensors[0].numel())
    if name in REDUCTIONS and tensors:
        dims = args[1] if len(args) > 1 and isinstance(args[1], (int, list, tuple)) else None
        if isinstance(dims, int):
            return int(tensors[0].shape[dims]) if tensors[0].dim() else 1
        if dims:
            return math.prod(tensors[0].shape[d] for d in dims)
        return tensors[0].numel()
    return 1


def _conv_length(weight: torch.Tensor, args) -> int:
    """in-channels per group x kernel size. The weight is (out, in/groups, *kernel), or for a
    transposed convolution (in, out/groups, *kernel), whose outputs each sum over in/groups
    channels (at most the whole kernel)."""
    transposed = next((a for a in args[6:7] if isinstance(a, bool)), False)
    groups = next((a for a in args[8:9] if isinstance(a, int) and not isinstance(a, bool)), 1)
    channels = weight.shape[0] // max(groups, 1) if transposed else weight.shape[1]
    return max(int(channels) * math.prod(int(k) for k in weight.shape[2:]), 1)


def attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one fused attention call, from shapes (..., S, E): 2·Sq·Sk·(E + Ev) per query head,
    QKᵀ and then PV. Grouped-query heads share K and V but each query head does its own products,
    so the query's batch and head dims count. A causal call is counted whole, as the math kernel
    computes it (its bmm's) and as torch counts it: every SDPA variant gives the same number."""
    *lead, sq, e = query
    return 2 * math.prod(lead) * sq * key[-2] * (e + value[-1])


# Every fused SDPA variant, counted by one formula: torch's own formulas count CPU flash as 0 and,
# in torch 2.11, assert equal query and key head counts, which grouped-query attention breaks.
# The math variant decomposes into bmm's, which torch counts.
ATTENTION_OPS = tuple(getattr(_ATEN, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(_ATEN, name))


# Other libraries' ops counted like aten's (vLLM's oneDNN GEMM, registered by its plugin), by op
# packet: (FLOPs from the args' shapes, as FlopCounterMode's formulas take them; the reduction
# length from the args; the bytes it reads that its args do not show, e.g. weights held by a handle)
FOREIGN_OPS: dict = {}


def register_op(op, *, flops: Callable[..., int], reduction: Callable[[tuple], int],
                hidden_bytes: Callable[[tuple], int] = lambda args: 0) -> None:
    """Count a custom op (an OpOverload or its packet) that torch's counter does not know:
    `flops(*arg_shapes, out_shape=...)`, `reduction(args)` (the tolerance's K), `hidden_bytes(args)`."""
    FOREIGN_OPS[getattr(op, "_overloadpacket", op)] = (flops, reduction, hidden_bytes)


def flop_counter() -> FlopCounterMode:
    mode = FlopCounterMode(display=False, custom_mapping={**{op: attention_flops for op in ATTENTION_OPS},
                                                          **{op: f[0] for op, f in FOREIGN_OPS.items()}})
    mode.mod_tracker = _GlobalOnly()  # only the total is read; per-module tracking hooks every output
    return mode


class _GlobalOnly:
    """FlopCounterMode's module tracker, reduced to the one parent the total is read from. The
    real one registers autograd hooks on every module output that requires grad, and asserts on
    a leaf tensor a module returns as it is (an hf:mixtral graph piece returning a parameter)."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


class BytesCounterMode(TorchDispatchMode):
    """Counts the least bytes a run must move: every tensor it did not create, read once, plus
    every output it returns. Also records whether any op did arithmetic (else it is a copy op),
    the bytes the explicit copy ops moved, and the longest reduction any op made."""

    def __init__(self) -> None:
        super().__init__()
        self.created: set[int] = set()
        self.external: dict[tuple[int, int], int] = {}
        self.only_copies = True
        self.copy_bytes = 0
        self.max_reduction = 1
        self.network_bytes = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and _storage_ptr(t) not in self.created:
                self.external[(t.data_ptr(), t.nbytes)] = t.nbytes
        out = func(*args, **kwargs)
        foreign = FOREIGN_OPS.get(func._overloadpacket)
        if foreign is not None:
            self.external[("hidden", len(self.external))] = int(foreign[2](args))
        self.max_reduction = max(self.max_reduction, reduction_length(func, args))
        if func.namespace == "c10d":  # a collective (torch.distributed): bytes over the link, no arithmetic here
            self.network_bytes += _bus_bytes(func, args)
        elif func in COPY_OPS:
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
    max_reduction: int = 1  # the most terms summed into one output element, by any op
    network_bytes: float = 0.0  # bytes each rank moved over its link in collectives (parallel.bus_factor)


def count(fn, *args) -> tuple[object, Counts]:
    """Run fn(*args) once under both counters; bytes = external reads + returned outputs."""
    flop_mode = flop_counter()
    byte_mode = BytesCounterMode()
    with torch.no_grad(), flop_mode, byte_mode:
        out = fn(*args)
    out_bytes = sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    counts = Counts(flops=float(flop_mode.get_total_flops()), bytes=float(byte_mode.external_bytes + out_bytes),
                    only_copies=byte_mode.only_copies, copy_bytes=byte_mode.copy_bytes,
                    max_reduction=byte_mode.max_reduction, network_bytes=byte_mode.network_bytes)
    return out, counts


def _bus_bytes(func, args) -> float:
    """A collective's bus bytes: its whole tensor (the largest of its tensor arguments: an
    all-reduce's tensor, an all-gather's output, a reduce-scatter's input) times the bus factor."""
    import torch.distributed as dist

    from .parallel import bus_factor

    sizes = [sum(t.nbytes for t in tree_leaves(a) if isinstance(t, torch.Tensor)) for a in args
             if isinstance(a, (torch.Tensor, list, tuple))]
    world = dist.get_world_size() if dist.is_initialized() else 1
    return max(sizes, default=0) * bus_factor(func._schema.name, world)


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device: a value read on the host
    (`.item()`, `bool(t)`, `torch.equal`) or an output shape that depends on values (`nonzero`,
    masked or boolean indexing, `unique`, `repeat_interleave` by a tensor), as ATen tags them.
    Such an op breaks CUDA-graph capture and stalls every stream behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = func.tags
        if torch.Tag.data_dependent_output in tags or (
                torch.Tag.dynamic_output_shape in tags
                and (func is not _ATEN.index.Tensor or _bool_index(args))):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in tree_leaves(args[1:]))


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


_FREE = {"aten::empty", "aten::empty_like", "aten::zeros", "aten::zeros_like", "aten::full", "aten::arange",
         "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty_strided"}


def _is_view(func) -> bool:
    """View and allocation ops move no data."""
    return func.is_view or func._schema.name in _FREE
