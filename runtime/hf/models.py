"""Hugging Face architectures as tunable workloads: `--model hf:<arch>[:<preset>[:<layers>]]`.

    hf:llama                 LlamaForCausalLM with llama-small's sizes, 2 decoder layers
    hf:qwen2:llama3-8b       Qwen2 with llama3-8b's sizes
    hf:mixtral:mixtral-tiny:4

The model is built from a transformers config with random weights (nothing is downloaded),
captured whole by dynamo (compile_backend.py), and cut into the same ops the schedule backend
cuts at serving time, so a record tuned here applies to that model there (same op names, for
the same architecture, sizes and number of layers). An HF model runs one step kind per call, so
a workload is decode-only (`d<requests>x<context>`: one new token per request against a static
cache holding <context> positions) or prefill-only (`p<tokens>c<chunk>`: requests of <chunk>
tokens into an empty cache). Each run starts from the same cache state: writes land on the same
positions, and the position counters advance in per-nano-batch copies only.
"""
from __future__ import annotations


import torch
from torch import nn

from ..batch import REQUESTS, BatchLayout
from ..case import Case
from ..executor import first_tensor
from ..schedule import Schedule
from ..shapes import ShapeLog
from ..workload import PRESETS, Workload, register_case_builder
from .compat import cache_kwargs, check_transformers, whole_graph_note
from .compile_backend import LIVE, GraphRunner, join_outputs, nano_args

HF_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
}


def parse_hf(model: str) -> tuple[str, str, int]:
    """(architecture, preset whose sizes it takes, decoder layers) of `hf:<arch>[:<preset>[:<layers>]]`;
    a bad field is one error naming it."""
    form = "hf:<arch>[:<preset>[:<layers>]], e.g. hf:llama or hf:qwen2:llama3-8b:2"
    fields = model.split(":")
    if fields[0] != "hf" or not 2 <= len(fields) <= 4:
        raise ValueError(f"model {model!r} must be {form}.")
    arch, preset, layers = fields[1], fields[2] if len(fields) > 2 else "llama-small", fields[3] if len(fields) > 3 else "2"
    if arch not in HF_ARCHS:
        raise ValueError(f"model {model!r} must be {form}, with arch one of {sorted(HF_ARCHS)}, but the "
                         f"architecture is {arch!r}.")
    if preset not in PRESETS:
        raise ValueError(f"model {model!r}: sizes come from a preset {sorted(PRESETS)}, not {preset!r}.")
    if not (layers.isascii() and layers.isdigit()) or not 1 <= int(layers) <= 128:
        raise ValueError(f"model {model!r}: layers must be in [1, 128] (a whole number), but got {layers!r}.")
    return arch, preset, int(layers)


def _transformers(model: str):
    """The transformers module, or one line saying how to install it (an `hf:` model needs it)."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"model {model!r} needs transformers, which is not installed: "
                         "pip install \"dynaflow-tune[hf]\"") from None
    return transformers


def build_model(model: str, dtype: torch.dtype, device: str, seed: int = 0):
    """(the HF model, its config) for an `hf:` spec, random weights from `seed`."""
    transformers = _transformers(model)
    check_transformers()
    arch, preset, layers = parse_hf(model)
    config_cls, model_cls, extra = HF_ARCHS[arch]
    p = PRESETS[preset]
    cfg = getattr(transformers, config_cls)(
        vocab_size=4096, hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=layers,
        num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads, head_dim=p.head_dim,
        max_position_embeddings=8192, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg).to(device=device, dtype=dtype).eval(), cfg


class GraphCall(nn.Module):
    """The captured graph as the model the runtime verifies against: the whole batch, position
    counters advanced in copies (every run starts from the same cache state), the logits out."""

    def __init__(self, runner: GraphRunner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, *args):
        args = tuple(a.clone() if k == "mutated" else a for a, k in zip(args, self.runner.kinds))
        return first_tensor(self.runner.gm(*args))


def build_hf_case(w: Workload) -> Case:
    transformers = _transformers(w.model)
    if w.num_decode and w.prefill_tokens:
        raise ValueError(f"workload {w.key}: an HF model runs decode and prefill in separate calls; "
                         "give a decode-only (d<N>x<context>) or a prefill-only (p<tokens>c<chunk>) workload.")
    model, cfg = build_model(w.model, w.torch_dtype, w.device, w.seed)
    rows, tokens = (w.num_decode, 1) if w.num_decode else (w.num_prefill, w.chunk)
    context = w.context_len if w.num_decode else 0
    cache = transformers.StaticCache(config=cfg, max_cache_len=context + tokens)
    cache.early_initialization(rows, cfg.num_key_value_heads, cfg.head_dim, w.torch_dtype, torch.device(w.device))
    gen = torch.Generator().manual_seed(w.seed + 1)
    for layer in cache.layers:  # a cache holding `context` positions of earlier tokens
        for t in (layer.keys, layer.values):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            torch._dynamo.mark_dynamic(t, 0)
        layer.cumulative_length.fill_(min(context, layer.max_cache_len - tokens))
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = int(layer.cumulative_length)
    ids = torch.randint(0, cfg.vocab_size, (rows, tokens), generator=gen).to(w.device)
    torch._dynamo.mark_dynamic(ids, 0)
    captured: dict = {}

    def capture(gm, example_inputs):
        runner = GraphRunner(gm, _never_split, ShapeLog())
        captured["graphs"] = captured.get("graphs", 0) + 1  # more than one: a graph break cut the model

        def first_call(*args):
            captured.setdefault("args", args)
            captured.setdefault("runner", runner)
            saved = [a.clone() if k == "mutated" else None for a, k in zip(args, runner.kinds)]
            out = gm(*args)
            for a, s in zip(args, saved):  # the capture call must not move the cache on
                if s is not None:
                    a.copy_(s)
            return out

        return first_call

    torch._dynamo.reset()  # dynamo keeps a few compiled entries per function: a tuner builds a model per workload
    LIVE.unsplit = True
    failed = None
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture)(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    except Exception as e:  # dynamo refused the model (a constraint it could not keep across a graph break, ...)
        failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        LIVE.unsplit = False
    if failed or captured.get("graphs") != 1 or not captured["runner"].splittable:
        note = failed or whole_graph_note()
        raise ValueError(f"model {w.model!r}: dynamo did not capture it whole with a symbolic batch"
                         f"{f' ({note})' if note else ''}; it cannot be tuned at op granularity.")
    runner: GraphRunner = captured["runner"]
    args = captured["args"]
    kinds = runner.kinds
    layout = BatchLayout(request_tokens=(tokens,) * rows, request_kinds=("decode" if w.num_decode else "prefill",) * rows,
                         input_axes=tuple(REQUESTS if k == "rows" else None for k in kinds),
                         kinds=("decode", "prefill"), output_axis=REQUESTS)

    def nano_inputs(inputs, r0: int, r1: int) -> tuple:
        return nano_args(inputs, kinds, r0, r1)

    def gather(plan) -> None:
        rows_of = [r1 - r0 for r0, r1 in plan.ranges]
        plan.out.copy_(first_tensor(join_outputs([plan.outputs(b) for b in range(len(plan.ranges))], rows_of)))

    return Case(model=GraphCall(runner), inputs=tuple(args), layout=layout, name=w.model, graph=runner.graph,
                nano_inputs=nano_inputs, gather=gather)


def _never_split(layout) -> Schedule:
    return Schedule()


register_case_builder("hf:", build_hf_case)
