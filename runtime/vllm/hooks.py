"""Every vLLM name the plugin touches that is not a documented extension point, in one place.

vLLM's documented extension points (the `vllm.general_plugins` entry point, a compilation
backend named in `compilation_config`) need no code here. What does: the forward context the
attention ops read their per-step metadata from, the attention metadata of the backends whose
nano-batches the plugin can cut, the custom ops that read that context, the one function
patched so that an environment variable alone turns the plugin on, and the engine calls the
tuner steps vLLM with to form a step of a bucket's shape (replay.py). `check()` says which of them
the installed vLLM lacks, in one message, and a test runs it against the installed vLLM.
"""
from __future__ import annotations

import dataclasses
import importlib
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

# The custom ops that read the forward context (their layer's metadata, slot mapping, KV cache).
CONTEXT_OPS = ("unified_attention_with_output", "unified_kv_cache_update")
# (module, attribute) pairs the plugin uses; check() imports each.
NAMES = (
    ("vllm.forward_context", "get_forward_context"),
    ("vllm.forward_context", "override_forward_context"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_request"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.step"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.abort_request"),
    ("vllm.config.compilation", "CompilationConfig.init_backend"),
    ("vllm.config.compilation", "CompilationMode.DYNAMO_TRACE_ONCE"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata"),
    ("vllm._custom_ops", "cpu_attn_get_scheduler_metadata"),
    ("vllm.envs", "VLLM_CPU_ATTN_SPLIT_KV"),
)
CONTEXT_FIELDS = ("attn_metadata", "slot_mapping", "no_compile_layers")
CPU_FIELDS = ("num_actual_tokens", "max_query_len", "query_start_loc", "max_seq_len", "seq_lens", "block_table",
              "slot_mapping", "scheduler_metadata", "causal", "dynamic_causal", "use_sdpa_prefill", "num_decode_tokens",
              "sdpa_attn_masks", "sdpa_start_loc", "encoder_cache")
# The forward context is one per process, and vLLM's CPU kernels (oneDNN GEMM handlers, rotary
# embedding, attention scratchpads) are not safe to enter from two threads at once (two streams
# running one projection corrupted the heap): on the CPU, tasks calling them take turns.
_LOCK = threading.RLock()


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check() -> None:
    """Raise RuntimeError naming every private vLLM name the plugin relies on that the installed
    vLLM lacks (a vLLM release this plugin was not written for)."""
    missing = []
    for module, dotted in NAMES:
        try:
            _resolve(module, dotted)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}.{dotted} ({type(e).__name__}: {e})")
    try:
        from vllm.forward_context import ForwardContext
        fields = {f.name for f in dataclasses.fields(ForwardContext)}
        missing += [f"ForwardContext.{f}" for f in CONTEXT_FIELDS if f not in fields]
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
        cpu_fields = {f.name for f in dataclasses.fields(CPUAttentionMetadata)}
        missing += [f"CPUAttentionMetadata.{f}" for f in CPU_FIELDS if f not in cpu_fields]
        unknown = sorted(cpu_fields - set(CPU_FIELDS))
        missing += [f"CPUAttentionMetadata has fields the plugin does not slice: {unknown}"] if unknown else []
    except (ImportError, TypeError) as e:
        missing.append(f"vllm's forward context or CPU attention metadata ({type(e).__name__}: {e})")
    for op in CONTEXT_OPS:
        if not hasattr(getattr(torch.ops, "vllm"), op):
            missing.append(f"torch.ops.vllm.{op}")
    if missing:
        import vllm
        raise RuntimeError(f"dynaflow's vLLM plugin was written for vLLM 0.32 and does not know this vLLM "
                           f"({vllm.__version__}): it lacks {'; '.join(missing)}. Schedules cannot be applied; "
                           f"unset DYNAFLOW_VLLM_SCHEDULES or install a vLLM this plugin supports.")


def install(wrap: Callable[[Any, Any], Any]) -> None:
    """Route vLLM's compilation through `wrap(backend, vllm_config)`: vLLM resolves its own
    backend (inductor, eager, a custom one) as always, and the plugin wraps it. Once per process."""
    from vllm.config.compilation import CompilationConfig, CompilationMode

    original = CompilationConfig.init_backend
    if getattr(original, "_dynaflow", False):
        return

    def init_backend(self, vllm_config, *args, **kwargs):
        backend = original(self, vllm_config, *args, **kwargs)
        if self.mode != CompilationMode.DYNAMO_TRACE_ONCE:  # piecewise (VLLM_COMPILE) graphs are not cut yet
            return backend
        return wrap(backend, vllm_config)

    init_backend._dynaflow = True
    CompilationConfig.init_backend = init_backend


def count_vllm_ops() -> None:
    """vLLM's CPU GEMM (`_C.onednn_mm(out [M, N], x [M, K], bias, handler)`) counted as a matmul:
    2 M N K FLOPs, K terms per output element, and its K x N weight (held in oneDNN's handle, not
    an argument) read once, so that the ops' resource classes and the tolerance see vLLM's
    projections as they see aten's. Its attention op reads the KV cache through its layer, not its
    arguments: counted as the bytes it is given."""
    from ..counters import register_op

    op = getattr(getattr(torch.ops, "_C", None), "onednn_mm", None)
    if op is not None:
        register_op(op.default, flops=lambda out, x, *rest, out_shape=None: 2 * out[0] * out[1] * x[1],
                    reduction=lambda args: args[1].shape[-1],
                    hidden_bytes=lambda args: args[1].shape[-1] * args[0].shape[-1] * args[0].element_size())


def forward_context():
    from vllm.forward_context import get_forward_context
    return get_forward_context()


def step_metadata() -> tuple[dict | None, dict | None]:
    """This step's attention metadata (layer name -> metadata) and slot mappings (layer -> slots);
    (None, None) in a profiling or dummy run."""
    try:
        ctx = forward_context()
    except AssertionError:  # no forward context set: a call outside a step
        return None, None
    md = ctx.attn_metadata
    return (md if isinstance(md, dict) and md else None), (ctx.slot_mapping if isinstance(ctx.slot_mapping, dict)
                                                         else None)


def reads_context(target) -> bool:
    """Whether an fx call target is one of vLLM's ops that read the forward context."""
    name = str(target)
    return name.startswith("vllm.") and name.split(".")[1].split(".")[0] in CONTEXT_OPS


def is_vllm_kernel(target) -> bool:
    """Whether an fx call target is one of vLLM's own ops (`torch.ops._C.*`, `torch.ops.vllm.*`)."""
    return str(target).startswith(("_C.", "_C_", "vllm."))


@contextmanager
def kernels_in_turn() -> Iterator[None]:
    """Hold the lock vLLM's CPU kernels are entered under (one thread at a time)."""
    with _LOCK:
        yield


@contextmanager
def nano_context(metadata: dict, slots: dict | None) -> Iterator[None]:
    """Run with the forward context showing one nano-batch's metadata and slot mappings."""
    ctx = forward_context()
    with _LOCK:
        saved = ctx.attn_metadata, ctx.slot_mapping
        ctx.attn_metadata, ctx.slot_mapping = metadata, slots if slots is not None else ctx.slot_mapping
        try:
            yield
        finally:
            ctx.attn_metadata, ctx.slot_mapping = saved


def read_step(metadata: dict) -> tuple[tuple[int, ...], int] | str:
    """The step's (query_start_loc, longest sequence) from its attention metadata, or why it cannot
    be cut into nano-batches. Layers sharing one metadata object (a KV-cache group) are read once."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    seen: dict[int, tuple[int, ...]] = {}
    context = 0
    for name, m in metadata.items():
        if id(m) in seen:
            continue
        if not isinstance(m, CPUAttentionMetadata):
            return f"layer {name}'s attention metadata is {type(m).__name__}; the plugin cuts CPUAttentionMetadata only"
        if m.use_sdpa_prefill or m.sdpa_attn_masks is not None or m.encoder_cache is not None \
                or m.dynamic_causal is not None:
            return f"layer {name} uses SDPA prefill, an encoder cache or a dynamic causal mask, which the plugin does not cut"
        seen[id(m)] = tuple(m.query_start_loc.tolist())
        context = max(context, int(m.max_seq_len))
    starts = set(seen.values())
    if len(starts) != 1:
        return "the layers' attention metadata disagree on the step's requests"
    return starts.pop(), context


def slice_metadata(metadata: dict, slots: dict | None, r0: int, r1: int, layers: dict,
                   dtype: torch.dtype) -> tuple[dict, dict | None]:
    """One nano-batch's (metadata, slot mappings): requests [r0, r1) of the step, sliced from each
    layer's CPUAttentionMetadata, with the CPU kernel's scheduler metadata rebuilt for them (as
    CPUAttentionMetadataBuilder.build makes it). Layers sharing metadata share the slice."""
    from vllm import _custom_ops as ops
    from vllm import envs

    made: dict[int, Any] = {}
    out = {}
    for name, m in metadata.items():
        if id(m) not in made:
            qsl = m.query_start_loc
            t0, t1 = int(qsl[r0]), int(qsl[r1])
            nano_qsl = qsl[r0:r1 + 1] - qsl[r0]
            seq_lens = m.seq_lens[r0:r1]
            layer = layers[name]
            window = getattr(layer.impl, "sliding_window", None)
            scheduler = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=r1 - r0, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
                head_dim=layer.head_size, seq_lens=seq_lens, dtype=dtype, query_start_loc=nano_qsl,
                causal=m.causal, sliding_window_size=-1 if window is None else window, isa=layer.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=layer.kv_cache_dtype)
            decode = min(max(m.num_decode_tokens - t0, 0), t1 - t0)
            made[id(m)] = dataclasses.replace(
                m, num_actual_tokens=t1 - t0, max_query_len=int((nano_qsl[1:] - nano_qsl[:-1]).max()),
                query_start_loc=nano_qsl, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
                block_table=m.block_table[r0:r1], slot_mapping=m.slot_mapping[t0:t1], scheduler_metadata=scheduler,
                num_decode_tokens=decode)
        out[name] = made[id(m)]
    nano_slots = None
    if slots is not None:
        qsl = next(iter(metadata.values())).query_start_loc
        t0, t1 = int(qsl[r0]), int(qsl[r1])
        nano_slots = {name: s[t0:t1] if isinstance(s, torch.Tensor) else s for name, s in slots.items()}
    return out, nano_slots


def config_facts(vllm_config) -> dict:
    """What the plugin reads of vLLM's config: the model's folder or name, its dtype, the device
    type, and the inductor options vLLM compiles with."""
    return {"model": str(vllm_config.model_config.model), "dtype": vllm_config.model_config.dtype,
            "device_type": vllm_config.device_config.device_type,
            "inductor_config": dict(getattr(vllm_config.compilation_config, "inductor_compile_config", {}) or {})}


def attention_layers() -> dict:
    """Layer name -> vLLM Attention module, from the forward context."""
    return forward_context().no_compile_layers


def kept_step(metadata: dict, slots: dict | None) -> tuple[Any, dict, dict | None]:
    """The forward context of the step in flight, with copies of its metadata and slot mappings
    (vLLM refills their buffers at the next step), so that it can be replayed after the step
    (replayed_context). Layers sharing one metadata object share its copy."""
    copies: dict[int, Any] = {}

    def copy(m):
        if id(m) not in copies:
            copies[id(m)] = dataclasses.replace(m, **{f.name: getattr(m, f.name).clone() for f in dataclasses.fields(m)
                                                      if isinstance(getattr(m, f.name), torch.Tensor)})
        return copies[id(m)]

    kept_md = {name: copy(m) for name, m in metadata.items()}
    kept_slots = None if slots is None else {n: s.clone() if isinstance(s, torch.Tensor) else s for n, s in slots.items()}
    return forward_context(), kept_md, kept_slots


@contextmanager
def replayed_context(ctx, metadata: dict, slots: dict | None) -> Iterator[None]:
    """Run with `ctx` (a kept step's forward context) as the forward context, showing `metadata`
    and `slots`: a captured step replayed outside vLLM's own step (tuning, replay.py)."""
    from vllm.forward_context import override_forward_context

    with _LOCK, override_forward_context(dataclasses.replace(ctx, attn_metadata=metadata, slot_mapping=slots)):
        yield
