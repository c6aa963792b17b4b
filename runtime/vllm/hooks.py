"""Every vLLM name the plugin touches that is not a documented extension point, in one place.

vLLM's documented extension points (the `vllm.general_plugins` entry point, a compilation
backend named in `compilation_config`) need no code here. What does: the forward context the
attention ops read their per-step metadata from; the model runner's attention-metadata build,
which the plugin watches to keep each step's `CommonAttentionMetadata` per attention group; vLLM's
own micro-batch machinery (`UBatchSlice`, `split_attn_metadata`, an attention group's builders,
as its dual-batch overlap uses them), which makes each nano-batch's metadata for whatever
attention backend the group has; the custom ops that read the forward context; the one function
patched so that an environment variable alone turns the plugin on; and the engine calls the tuner
steps vLLM with (tuner/vllm_engine.py). `check()` says which of them the installed vLLM lacks, in one
message; a test runs it against the installed vLLM and `scripts/check_vllm_names.py` against a
vLLM wheel read as a zip (nothing installed).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger("vllm.dynaflow")

# The custom ops that read the forward context (their layer's metadata, slot mapping, KV cache).
CONTEXT_OPS = ("unified_attention_with_output", "unified_kv_cache_update")
# (module, attribute) pairs the plugin uses; check() imports each, scripts/check_vllm_names.py
# finds each in a wheel's source.
NAMES = (
    ("vllm.forward_context", "get_forward_context"),
    ("vllm.forward_context", "override_forward_context"),
    ("vllm.forward_context", "ForwardContext"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_request"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.step"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.abort_request"),
    ("vllm.config.compilation", "CompilationConfig.init_backend"),
    ("vllm.config.compilation", "CompilationMode.DYNAMO_TRACE_ONCE"),
    ("vllm.config.compilation", "CUDAGraphMode.NONE"),
    ("vllm.config.compilation", "CompilationConfig.mode"),
    ("vllm.config.compilation", "CompilationConfig.cudagraph_mode"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model"),
    ("vllm.v1.worker.ubatch_utils", "UBatchSlice"),
    ("vllm.v1.worker.ubatch_utils", "split_attn_metadata"),
    ("vllm.v1.worker.utils", "AttentionGroup.create_metadata_builders"),
    ("vllm.v1.worker.utils", "AttentionGroup.build_metadata"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata"),
)
CONTEXT_FIELDS = ("attn_metadata", "slot_mapping", "no_compile_layers")
# The arguments of GPUModelRunner._build_attention_metadata the plugin reads, and the attributes
# of the runner and its attention groups it uses.
BUILD_ARGS = ("ubatch_slices", "for_cudagraph_capture")
GROUP_FIELDS = ("layer_names", "kernel_block_size", "metadata_builders")
# CommonAttentionMetadata: what vLLM's split_attn_metadata carries into each micro-batch, what the
# plugin carries itself (sliced by requests or tokens), and what it needs at its default (else the
# step runs sequential, naming the field): vLLM's split drops those.
SPLIT_KEEPS = ("query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
               "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "seq_lens_cpu_upper_bound")
CARRIED = {"positions": "tokens", "is_prefilling": "requests"}
MUST_BE_DEFAULT = {"causal": True, **dict.fromkeys((
    "logits_indices_padded", "num_logits_indices", "max_logits_per_req", "encoder_seq_lens", "encoder_seq_lens_cpu",
    "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound", "req_idx", "mm_req_doc_ranges", "rswa_prefix_lens",
    "replayssm_decode_base_cpu"))}
COMMON_FIELDS = SPLIT_KEEPS + tuple(CARRIED) + tuple(MUST_BE_DEFAULT)  # every field the plugin knows
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
        from vllm.v1.attention.backend import CommonAttentionMetadata
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.utils import AttentionGroup

        for cls, wanted in ((ForwardContext, CONTEXT_FIELDS), (AttentionGroup, GROUP_FIELDS),
                            (CommonAttentionMetadata, COMMON_FIELDS)):
            fields = {f.name for f in dataclasses.fields(cls)}
            missing += [f"{cls.__name__}.{f}" for f in wanted if f not in fields]
        # a field vLLM added since: the plugin would neither carry it into a nano-batch nor refuse it
        unknown = sorted(f.name for f in dataclasses.fields(CommonAttentionMetadata)
                         if f.name not in COMMON_FIELDS and not f.name.startswith("_"))
        missing += [f"CommonAttentionMetadata has fields the plugin does not know: {unknown}"] if unknown else []
        params = inspect.signature(GPUModelRunner._build_attention_metadata).parameters
        missing += [f"GPUModelRunner._build_attention_metadata({a}=...)" for a in BUILD_ARGS if a not in params]
    except (ImportError, AttributeError, TypeError) as e:
        missing.append(f"vllm's forward context, model runner or attention metadata ({type(e).__name__}: {e})")
    for op in CONTEXT_OPS:
        if not hasattr(getattr(torch.ops, "vllm"), op):
            missing.append(f"torch.ops.vllm.{op}")
    if missing:
        import vllm
        raise RuntimeError(f"dynaflow's vLLM plugin was written for vLLM 0.32-0.33 and does not know this vLLM "
                           f"({vllm.__version__}): it lacks {'; '.join(missing)}. Schedules cannot be applied; "
                           f"unset DYNAFLOW_VLLM_SCHEDULES or install a vLLM this plugin supports.")


def uncovered(vllm_config) -> str | None:
    """Why the plugin cannot schedule steps in the mode `vllm_config` runs in, or None. Covered:
    one graph of the whole model (compilation mode DYNAMO_TRACE_ONCE, as vLLM's CPU build always
    runs), steps run eagerly (CUDA graphs off: cudagraph_mode NONE, a graph would freeze one
    schedule's launches for every batch of its size), and vLLM's V1 model runner (the one whose
    attention-metadata build the plugin watches; V2 is the GPU default from vLLM 0.33 where it
    supports the model)."""
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.mode != CompilationMode.DYNAMO_TRACE_ONCE:
        return (f"compilation mode {getattr(cc.mode, 'name', cc.mode)} (the plugin cuts the one graph of "
                "compilation mode DYNAMO_TRACE_ONCE: -cc.mode=DYNAMO_TRACE_ONCE)")
    graphs = cc.cudagraph_mode
    if graphs is not None and graphs != CUDAGraphMode.NONE:
        return (f"cudagraph_mode {getattr(graphs, 'name', graphs)} (a CUDA graph replays one schedule's launches "
                "for every batch of its size: -cc.cudagraph_mode=NONE)")
    if getattr(vllm_config, "use_v2_model_runner", False):
        return ("vLLM's V2 model runner (the plugin reads each step's attention metadata from the V1 runner: "
                "VLLM_USE_V2_MODEL_RUNNER=0)")
    return None


def install(wrap: Callable[[Any, Any], Any]) -> None:
    """Route vLLM's compilation through `wrap(backend, vllm_config)` in the modes the plugin
    covers (`uncovered`): vLLM resolves its own backend (inductor, eager, a custom one) as always,
    and the plugin wraps it. In any other mode, one WARNING naming the mode, and vLLM's backend
    as it was. Once per process."""
    from vllm.config.compilation import CompilationConfig

    original = CompilationConfig.init_backend
    if getattr(original, "_dynaflow", False):
        return

    def init_backend(self, vllm_config, *args, **kwargs):
        backend = original(self, vllm_config, *args, **kwargs)
        ASKED.append(True)
        why = uncovered(vllm_config)
        if why is not None:
            if why not in UNCOVERED:
                UNCOVERED.append(why)
                log.warning("dynaflow: vLLM runs with %s, a mode the plugin does not cover; it leaves vLLM "
                            "untouched and every step runs as vLLM's own", why)
            return backend
        watch_metadata()
        return wrap(backend, vllm_config)

    init_backend._dynaflow = True
    CompilationConfig.init_backend = init_backend


UNCOVERED: list[str] = []  # the modes this process met that the plugin does not cover (each said once)
ASKED: list[bool] = []  # vLLM asked this process for a compilation backend (the plugin saw its mode)


def watch_first_step() -> None:
    """One WARNING at the model runner's first step when vLLM never asked for a compilation backend
    in this process: with `enforce_eager` (compilation mode NONE), and on the CPU runner in
    STOCK_TORCH_COMPILE, vLLM runs its model without the backend the plugin wraps, so `install`'s
    warning is never reached and the plugin, switched on, would do nothing without a word. Once
    per process; the runner's method is restored at its first call."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.execute_model
    if getattr(original, "_dynaflow", False):
        return

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        GPUModelRunner.execute_model = original
        if not ASKED:
            why = uncovered(self.vllm_config) or "no compilation backend (vLLM never asked for one)"
            UNCOVERED.append(why)
            log.warning("dynaflow: vLLM runs with %s, a mode the plugin does not cover; it leaves vLLM untouched "
                        "and every step runs as vLLM's own", why)
        return original(self, *args, **kwargs)

    execute_model._dynaflow = True
    GPUModelRunner.execute_model = execute_model


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


def watch_metadata() -> None:
    """Keep each step's attention inputs as vLLM's model runner makes them (`StepAttention`):
    `GPUModelRunner._build_attention_metadata` (the CPU runner's too: it subclasses it) runs as
    always, then once more with its attention groups replaced by `_Keeper`s, which keep the
    `CommonAttentionMetadata` each group's builder would be given and build nothing. Skipped for
    the runner's own micro-batches and CUDA-graph captures. Once per process."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "_dynaflow", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def build(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        _STEP.clear()
        if bound.get("ubatch_slices") is None and not bound.get("for_cudagraph_capture") \
                and isinstance(out[0], dict) and out[0]:
            groups = self.attn_groups
            keepers = [[_Keeper(g) for g in gs] for gs in groups]
            self.attn_groups = keepers
            try:
                original(self, *args, **kwargs)
            finally:
                self.attn_groups = groups
            _STEP.append(StepAttention(runner=self, built=out[0],
                                       groups=[(k.layer_names, k.common) for ks in keepers for k in ks]))
        return out

    build._dynaflow = True
    GPUModelRunner._build_attention_metadata = build


_STEP: list = []  # the StepAttention of the step vLLM built metadata for last (this process's model runner)


class _Keeper:
    """Stands in for an attention group while vLLM assembles a step's metadata: keeps the
    CommonAttentionMetadata its builder would be given (a builder that cannot update a cached
    block table, so that every group's is asked for) and builds nothing."""

    supports_update_block_table = False

    def __init__(self, group) -> None:
        self.layer_names, self.common = group.layer_names, None

    def get_metadata_builder(self, ubatch_idx: int = 0):
        return self

    def build_metadata(self, common_attn_metadata, ubatch_idx: int = 0, common_prefix_len: int = 0, **kwargs):
        self.common = common_attn_metadata
        return None


@dataclasses.dataclass(kw_only=True)
class StepAttention:
    """One step's attention inputs, per attention group: the group's layers and the
    CommonAttentionMetadata vLLM gave its builder. A nano-batch's metadata (`nano`) is vLLM's
    `split_attn_metadata` of it through the group's own builder at the nano-batch's slot (a
    builder per slot, as vLLM's micro-batches have: builders may keep per-build state)."""

    runner: Any  # vLLM's model runner
    built: dict  # what vLLM built for the whole step (its forward context's attn_metadata)
    groups: list  # (layer names, CommonAttentionMetadata), in the runner's order of attention groups

    @functools.cached_property
    def starts(self) -> tuple[int, ...]:
        """The step's query_start_loc: read once per step (every nano-batch's slices use it)."""
        cm = self.groups[0][1]
        return tuple(cm.query_start_loc_cpu[:cm.num_reqs + 1].tolist())

    @property
    def context_len(self) -> int:
        return max(int(cm.max_seq_len) for _, cm in self.groups)

    def why_not(self) -> str | None:
        """Why the step cannot be cut into nano-batches here, or None."""
        if not self.groups or any(cm is None for _, cm in self.groups):
            return "vLLM gave some attention group of the step no metadata to build"
        if getattr(self.runner, "speculative_config", None) is not None:
            return "vLLM runs speculative decoding, whose draft steps the plugin does not split"
        for names, cm in self.groups:
            for f, default in MUST_BE_DEFAULT.items():
                v = getattr(cm, f, default)
                if isinstance(v, torch.Tensor) or v is not default:
                    return (f"layer {names[0]}'s attention metadata sets {f}, which vLLM's micro-batch split "
                            "(split_attn_metadata) does not carry")
        if any(tuple(cm.query_start_loc_cpu[:cm.num_reqs + 1].tolist()) != self.starts for _, cm in self.groups[1:]):
            return "the attention groups disagree on the step's requests"
        return None

    def nano(self, slot: int, r0: int, r1: int) -> dict:
        """Layer name -> attention metadata for requests [r0, r1) of the step, each group's built
        by its builder `slot` (the nano-batch's index in its plan)."""
        from vllm.v1.worker.ubatch_utils import UBatchSlice, split_attn_metadata

        tokens, requests = self.tokens(r0, r1), slice(r0, r1)
        spare = _spare_groups(self.runner, slot + 1)
        out: dict = {}
        with _LOCK:  # builders and vLLM's CPU kernels they call: one thread at a time
            for i, (names, cm) in enumerate(self.groups):
                part = split_attn_metadata([UBatchSlice(requests, tokens)], cm)[0]
                for f, by in CARRIED.items():
                    v = getattr(cm, f, None)
                    if v is not None:
                        setattr(part, f, v[tokens if by == "tokens" else requests])
                md = spare[i].build_metadata(part, slot)
                out.update({name: md for name in names})
        return out

    def tokens(self, r0: int, r1: int) -> slice:
        starts = self.starts
        return slice(starts[r0], starts[r1])

    def kept(self) -> "StepAttention":
        """A copy whose metadata tensors are the step's values (vLLM refills its buffers at the
        next step), to build nano-batches from after the step (tuning: tuner/vllm_engine.py)."""
        return dataclasses.replace(self, built={}, groups=[(names, _cloned(cm)) for names, cm in self.groups])


def _cloned(obj):
    if not dataclasses.is_dataclass(obj):
        return obj
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).clone() for f in dataclasses.fields(obj)
                                       if f.init and isinstance(getattr(obj, f.name), torch.Tensor)})


def _spare_groups(runner, slots: int) -> list:
    """The runner's attention groups again (flattened in vLLM's order), with `slots` builders each
    of their own: made once per runner and grown when a schedule needs more, never sharing
    vLLM's builders (whose state the whole step's metadata may hold)."""
    have = getattr(runner, "_dynaflow_groups", None)
    if have is None or len(have[0].metadata_builders) < slots:
        made = []
        for gs in runner.attn_groups:
            for g in gs:
                spare = dataclasses.replace(g, metadata_builders=[])
                spare.create_metadata_builders(runner.vllm_config, runner.device, g.kernel_block_size,
                                               num_metadata_builders=max(slots, 2))
                made.append(spare)
        runner._dynaflow_groups = have = made
    return have


def step_attention(metadata: dict) -> "StepAttention | str":
    """The kept StepAttention of the step whose forward context holds `metadata`, or why none."""
    step = _STEP[0] if _STEP else None
    if step is None or step.built is not metadata:
        return ("vLLM made this step's attention metadata outside GPUModelRunner._build_attention_metadata "
                "(the plugin reads each step's from there)")
    why = step.why_not()
    return step if why is None else why


def nano_slots(slots: dict | None, tokens: slice) -> dict | None:
    """A nano-batch's slot mappings: each layer's sliced by the nano-batch's tokens (as vLLM's
    `_get_slot_mappings` slices them per micro-batch)."""
    if slots is None:
        return None
    return {name: s[tokens] if isinstance(s, torch.Tensor) else s for name, s in slots.items()}


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


def config_facts(vllm_config) -> dict:
    """What the plugin reads of vLLM's config: the model's folder or name, its dtype, the device
    type, and the inductor options vLLM compiles with."""
    return {"model": str(vllm_config.model_config.model), "dtype": vllm_config.model_config.dtype,
            "device_type": vllm_config.device_config.device_type,
            "inductor_config": dict(getattr(vllm_config.compilation_config, "inductor_compile_config", {}) or {})}


def kept_step(metadata: dict, slots: dict | None) -> tuple[Any, dict, dict | None]:
    """The forward context of the step in flight, with copies of its metadata and slot mappings
    (vLLM refills their buffers at the next step), so that it can be replayed after the step
    (replayed_context). Layers sharing one metadata object share its copy."""
    copies: dict[int, Any] = {}
    for m in metadata.values():
        if id(m) not in copies:
            copies[id(m)] = _cloned(m)
    kept_md = {name: copies[id(m)] for name, m in metadata.items()}
    kept_slots = None if slots is None else {n: s.clone() if isinstance(s, torch.Tensor) else s for n, s in slots.items()}
    return forward_context(), kept_md, kept_slots


@contextmanager
def replayed_context(ctx, metadata: dict, slots: dict | None) -> Iterator[None]:
    """Run with `ctx` (a kept step's forward context) as the forward context, showing `metadata`
    and `slots`: a captured step replayed outside vLLM's own step (tuning, tuner/vllm_engine.py)."""
    from vllm.forward_context import override_forward_context

    with _LOCK, override_forward_context(dataclasses.replace(ctx, attn_metadata=metadata, slot_mapping=slots)):
        yield
