"""Workloads: a model preset plus a batch (decode requests x context, prefill tokens), dtype, device.

`Workload.build()` gives a `Case`: the unchanged model, its inputs and their batch layout, the
one thing the runtime needs. A user model plugs in as a `module:callable` returning a Case.
"""
from __future__ import annotations

import importlib
import re
import sys
import traceback
from dataclasses import dataclass, fields
from pathlib import PurePath
from typing import Any, Callable

import torch

from . import devices, validate
from .batch import TOKENS, BatchLayout
from .case import Case
from .models.llama import LlamaConfig, LlamaLayer, init_shard, init_weights
from .models.moe import MixtralLayer, MoEConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(hidden=64, num_heads=4, num_kv_heads=2, intermediate=128, head_dim=16),
    "llama-small": LlamaConfig(hidden=1024, num_heads=8, num_kv_heads=4, intermediate=2816),
    "llama3-8b": LlamaConfig(hidden=4096, num_heads=32, num_kv_heads=8, intermediate=14336),
    # Llama-3-70B's layer; tp=8 gives its usual shard (8 heads, 1 kv head, 3584 intermediate, and the all-reduces)
    "llama3-70b": LlamaConfig(hidden=8192, num_heads=64, num_kv_heads=8, intermediate=28672),
    "mixtral-tiny": MoEConfig(hidden=64, num_heads=4, num_kv_heads=2, intermediate=64, head_dim=16),
    "mixtral-8x7b": MoEConfig(hidden=4096, num_heads=32, num_kv_heads=8, intermediate=14336, rope_theta=1e6),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """model: a preset name or "module:callable" (callable(workload) -> Case).
    prefill_tokens are cut into requests of prefill_chunk tokens (default: one request).
    tp: tensor parallelism; > 1 builds this rank's shard of a preset (runtime/parallel.py), in a
    process of a torch.distributed group of `tp` ranks; sequence_parallel: its all-reduces become
    reduce-scatters and all-gathers (runtime/models/llama.py)."""

    model: str
    num_decode: int = 0
    context_len: int = 0
    prefill_tokens: int = 0
    prefill_chunk: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    tp: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, but got {validate.short(getattr(self, name))}.")
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise ValueError(f"tp must be an int >= 1 (the tensor-parallel degree), but got {validate.short(self.tp)}.")
        if self.tp > 1 and self.model not in PRESETS:
            raise ValueError(f"tp={self.tp} shards the built-in presets {sorted(PRESETS)}, but model is "
                             f"{validate.short(self.model)}; tensor parallelism of other models is not built.")
        if self.tp > 1:
            PRESETS[self.model].shard(self.tp)  # heads and sizes it must divide: one error naming tp
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"sequence_parallel must be true or false, but got {validate.short(self.sequence_parallel)}.")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError(f"sequence_parallel needs tp > 1 (it splits a TP group's token rows), but tp={self.tp}.")
        for name in ("prefill_chunk", "seed"):
            value = getattr(self, name)
            if not (value is None and name == "prefill_chunk") and (not isinstance(value, int) or isinstance(value, bool)
                                                                   or value < (1 if name == "prefill_chunk" else 0)):
                raise ValueError(f"{name} must be an int >= {1 if name == 'prefill_chunk' else 0}"
                                 f"{' or null' if name == 'prefill_chunk' else ''}, but got {validate.short(value)}.")
        if self.model not in PRESETS and ":" not in self.model:
            raise ValueError(
                f"model must be a preset {sorted(PRESETS)}, a Hugging Face architecture 'hf:<arch>[:<preset>[:<layers>]]' "
                f"or 'module:callable', but got {validate.short(self.model)}."
            )
        for name in ("num_decode", "context_len", "prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, but got {validate.short(value)}.")
        if self.num_decode and self.context_len < 1 and self.model in PRESETS:
            raise ValueError(f"context_len must be >= 1 with decode requests, but got {self.context_len}.")
        if self.num_decode + self.prefill_tokens == 0 and self.model in PRESETS:
            raise ValueError("a workload needs num_decode > 0 or prefill_tokens > 0, but both are 0.")
        chunk = self.chunk
        if self.prefill_tokens and (chunk < 1 or self.prefill_tokens % chunk):
            raise ValueError(
                f"prefill_chunk must divide prefill_tokens={self.prefill_tokens}, but got {self.prefill_chunk}."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, but got {self.dtype!r}.")
        if not isinstance(self.device, str) or devices.parse(self.device) is None:
            raise ValueError(f"device must be {devices.spellings()}, but got {validate.short(self.device)}.")

    @classmethod
    def from_dict(cls, d: Any, name: str = "workload") -> "Workload":
        d = validate.obj(d, name)
        validate.known(d, _WORKLOAD_FIELDS, name)
        if "model" not in d:
            raise ValueError(f"{name}.model is missing.")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    @property
    def chunk(self) -> int:
        return self.prefill_chunk or self.prefill_tokens

    @property
    def num_prefill(self) -> int:
        return self.prefill_tokens // self.chunk if self.prefill_tokens else 0

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.prefill_tokens

    @property
    def key(self) -> str:
        """Stable, filename-safe; the device type is part of it, the device index is not."""
        parts = [f"d{self.num_decode}x{self.context_len}", f"p{self.prefill_tokens}"]
        if self.prefill_chunk and self.prefill_chunk != self.prefill_tokens:
            parts.append(f"c{self.prefill_chunk}")
        return self._named(parts)

    @property
    def family(self) -> str:
        """What the workloads of one model share on a device, whatever their batch: the key less the
        batch's shape (model, dtype, parallelism). Their performance profiles may lend each other
        their grid (runtime/perfmodel)."""
        return self._named([])

    def _named(self, shape: list[str]) -> str:
        parts = [re.sub(r"[^A-Za-z0-9.-]+", "-", model_name(self.model)), *shape, DTYPE_SHORT[self.dtype]]
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("sp" if self.sequence_parallel else ""))
        return "_".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def build_layout(self) -> BatchLayout:
        """The batch layout, without building the model (presets); user models build their case."""
        if self.model not in PRESETS:
            return self.build().layout
        return preset_layout(self.num_decode, self.num_prefill, self.chunk)

    def build(self) -> Case:
        check_device(self.device)
        if self.model in PRESETS:
            return build_preset(self)
        for prefix, builder in case_builders().items():  # registered by the layers above (runtime.hf: "hf:")
            if self.model.startswith(prefix):
                return builder(self)
        factory = load_callable(self.model)
        try:
            case = factory(self)
        except Exception as e:  # the user's factory failed: one line saying where, not a traceback
            where = traceback.extract_tb(e.__traceback__)[-1]
            first = str(e).splitlines()[0] if str(e) else ""
            raise ValueError(f"model {self.model!r}: calling it with the workload raised {type(e).__name__}: {first} "
                             f"({where.filename}:{where.lineno})") from None
        if not isinstance(case, Case):
            raise ValueError(f"model {self.model!r} must return a dynaflow.runtime.Case (model, inputs, layout), "
                             f"but returned {type(case).__name__}.")
        return case


def model_name(model: str) -> str:
    """The name records are stored and looked up by: the model itself, or what its prefix's
    registration names it (a vLLM model, `vllm:<folder>`, by its folder's name)."""
    integrations()
    for prefix, name in MODEL_NAMES.items():
        if model.startswith(prefix):
            return name(model)
    return model


def folder_name(prefix: str) -> Callable[[str], str]:
    """`<prefix><folder>` named by the folder's last part (`vllm:./models/llama` -> `vllm:llama`),
    as a serving engine names the model it serves, however the folder was spelled."""
    def name(model: str) -> str:
        folder = model.removeprefix(prefix)
        return prefix + (PurePath(folder).name or folder)
    return name


_WORKLOAD_FIELDS = frozenset(f.name for f in fields(Workload))
CASE_BUILDERS: dict[str, Callable[[Workload], Case]] = {}  # model prefix -> the builder of its cases
MODEL_NAMES: dict[str, Callable[[str], str]] = {}  # model prefix -> the name its records are stored by


def register_case_builder(prefix: str, builder: Callable[[Workload], Case], *,
                          name: Callable[[str], str] | None = None) -> None:
    """Models named `<prefix>...` are built by `builder(workload)` and their records stored under
    `name(model)` (default: the model as given). runtime.hf registers "hf:", runtime.vllm "vllm:";
    an integration is a module that registers itself, imported by `integrations()` (INTEGRATIONS)."""
    CASE_BUILDERS[prefix] = builder
    if name is not None:
        MODEL_NAMES[prefix] = name


INTEGRATIONS = ("dynaflow.runtime.hf", "dynaflow.runtime.vllm")  # each registers its prefix when imported


def integrations() -> None:
    """Import the integrations, so that their prefixes are registered (once; cheap after)."""
    for module in INTEGRATIONS:
        if module not in sys.modules:
            importlib.import_module(module)


def case_builders() -> dict[str, Callable[[Workload], Case]]:
    """Model prefix -> the builder of its cases, every integration's registered."""
    integrations()
    return CASE_BUILDERS


def check_device(device: str) -> None:
    """A device that is not there is a one-line error, not a traceback from deep in torch."""
    devices.check_device(device)


def preset_layout(num_decode: int, num_prefill: int, chunk: int) -> BatchLayout:
    """Built-in layers: decode tokens first, then prefill requests of `chunk` tokens each."""
    return BatchLayout(
        request_tokens=(1,) * num_decode + (chunk,) * num_prefill,
        request_kinds=("decode",) * num_decode + ("prefill",) * num_prefill,
        input_axes=(TOKENS, "decode", "decode", "decode", "prefill"), kinds=("decode", "prefill"),
    )


def preset_layout_of(inputs) -> BatchLayout:
    """The layout of a built-in layer's live inputs (x, k_cache, v_cache, decode_pos, prefill_pos)."""
    prefill_pos = inputs[4]
    return preset_layout(inputs[3].shape[0], prefill_pos.shape[0], prefill_pos.shape[1])


def build_preset(w: Workload) -> Case:
    """The preset's layer with seeded weights and inputs; at tp > 1, this rank's shard of them
    (the same values, sliced: a TP run equals the unsharded layer up to rounding)."""
    cfg = PRESETS[w.model]
    layer_cls = MixtralLayer if isinstance(cfg, MoEConfig) else LlamaLayer
    parallel = None
    if w.tp == 1:
        model = init_weights(layer_cls(cfg), w.seed)
    else:
        parallel = _parallel(w)
        with torch.device("meta"):
            full = layer_cls(cfg)
        model = init_shard(layer_cls(cfg.shard(w.tp), tp=w.tp, sequence_parallel=w.sequence_parallel), full, w.seed,
                           tp=w.tp, rank=parallel.rank)
    model = model.to(device=w.device, dtype=w.torch_dtype).eval()
    gen = torch.Generator().manual_seed(w.seed + 1)
    kv_shape = (w.num_decode, w.context_len + 1, cfg.num_kv_heads, cfg.head_dim)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=w.device, dtype=w.torch_dtype)

    def heads(cache: torch.Tensor) -> torch.Tensor:  # this rank's kv heads
        return cache if parallel is None else cache.chunk(w.tp, dim=2)[parallel.rank].contiguous()

    inputs = (
        rand(w.num_tokens, cfg.hidden), heads(rand(*kv_shape)), heads(rand(*kv_shape)),
        torch.full((w.num_decode,), w.context_len, dtype=torch.long, device=w.device),
        torch.arange(w.chunk, device=w.device).repeat(w.num_prefill, 1),
    )
    around = parallel.around(parallel.collectives(model)) if parallel else None
    return Case(model=model, inputs=inputs, layout=w.build_layout(), name=w.model, around=around, parallel=parallel)


def _parallel(w: Workload):
    """This process's rank in a group of w.tp ranks, or one error saying how to get one."""
    import torch.distributed as dist

    from . import parallel

    if not dist.is_initialized() or dist.get_world_size() != w.tp:
        have = f"a group of {dist.get_world_size()}" if dist.is_initialized() else "no torch.distributed group"
        raise ValueError(f"workload tp={w.tp} runs on {w.tp} ranks, one process each, but this process has {have}; "
                         f"`dynaflow-tune ... --tp {w.tp}` starts them.")
    return parallel.current()


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_callable(spec: str) -> Callable[[Workload], Case]:
    """`module:function`, the module importable by name (installed, or on PYTHONPATH;
    never a file path) and not from Python's standard library: a model factory is user code."""
    module_name, _, attr = spec.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr):
        raise ValueError(f"model {spec!r} must be a preset {sorted(PRESETS)} or 'module:function' with a dotted "
                         "Python module name (importable by this Python: installed, or on PYTHONPATH; not a file path).")
    if module_name.split(".")[0] in sys.stdlib_module_names or module_name.split(".")[0] == "builtins":
        raise ValueError(f"model {spec!r} names Python's standard library, not a model factory: give "
                         "'module:function' of your own code, returning a Case.")
    try:
        fn = importlib.import_module(module_name)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {spec!r}: cannot import {attr!r} from {module_name!r} ({e}).") from None
    except Exception as e:  # the module itself failed to import
        raise ValueError(f"model {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"model {spec!r} must name a callable(workload) -> Case, but it is {type(fn).__name__}.")
    return fn

