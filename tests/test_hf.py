"""Hugging Face models (random weights, built offline from configs) with their decoder layers
run under schedules: prefill and static-cache decode equal the unscheduled model."""
import pytest
import torch

from dynaflow.runtime import Schedule, StreamSpec, Step
from dynaflow.runtime import cache_kwargs
from dynaflow.runtime.hf import ScheduledDecoderLayer, apply_schedules, decoder_layers, remove_schedules

transformers = pytest.importorskip("transformers")
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # sliding windows shorter than the prompt: prefill fills the window, every decode step rolls it
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4, head_dim=16, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=4, head_dim=16,
                                                             layer_types=["sliding_attention", "full_attention"])),
}
ROWS, PROMPT, STEPS = 5, 7, 3


def build(arch: str, cls=None):
    """The architecture's model (or `cls`, a subclass of it) with random weights, and its config."""
    config_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(0)
    return (cls or getattr(transformers, model_cls))(cfg).eval(), cfg


def dbo_policy(layout):
    """Two nano-batches on two streams above 2 requests; the second issued first."""
    if layout.num_requests <= 2:
        return Schedule()
    first = layout.num_requests // 2
    return Schedule(split_sizes=(first, layout.num_requests - first), streams=(StreamSpec(), StreamSpec()),
                    order=(Step(op="layer", nano=1, stream=1), Step(op="layer", nano=0, stream=0)))


def generate(model, cfg, ids):
    """Prefill, then greedy decode steps with a static KV cache (on the ids' device, in the
    model's dtype); the logits of every step."""
    cache = transformers.StaticCache(config=cfg, max_cache_len=ids.shape[1] + STEPS + 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(ids.shape[0], cfg.num_key_value_heads, head_dim, model.dtype, ids.device)
    logits = []
    with torch.no_grad():
        for step in range(STEPS + 1):
            out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits)
            ids = out.logits[:, -1:].argmax(-1)
    return logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_scheduled_layers_equal_the_unscheduled_model(arch):
    model, cfg = build(arch)
    ids = torch.randint(0, COMMON["vocab_size"], (ROWS, PROMPT), generator=torch.Generator().manual_seed(1))
    reference = generate(model, cfg, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_schedules(model, dbo_policy)
    wrapped = list(decoder_layers(model))
    assert all(isinstance(layer, ScheduledDecoderLayer) for layer in wrapped)
    scheduled = generate(model, cfg, ids)
    assert all(layer.split_calls == STEPS + 1 for layer in wrapped)  # prefill and every decode step split
    assert all(layer.plans.built == 2 for layer in wrapped)  # one plan for the prefill shape, one for decode, reused
    for ref, got in zip(reference, scheduled):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    remove_schedules(model)
    assert not any(isinstance(layer, ScheduledDecoderLayer) for layer in decoder_layers(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # weights untouched


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_dynamic_cache_runs_unsplit_and_says_why_once(caplog, arch):
    model, cfg = build(arch)
    ids = torch.randint(0, COMMON["vocab_size"], (ROWS, PROMPT))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True).logits
        apply_schedules(model, dbo_policy)
        with caplog.at_level("WARNING", logger="dynaflow"):
            got = model(input_ids=ids, use_cache=True).logits
            model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(got, ref)
    said = [r for r in caplog.records if "runs unsplit" in r.getMessage()]
    assert len(said) == cfg.num_hidden_layers and all(r.levelname == "WARNING" for r in said)  # once per layer
    assert all("grows by concatenation and cannot be split by rows; use a StaticCache" in r.getMessage() for r in said)
    assert all(layer.split_calls == 0 for layer in decoder_layers(model))


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="Linear has no ModuleList of \\*DecoderLayer"):
        apply_schedules(torch.nn.Linear(2, 2), dbo_policy)


def test_applying_again_replaces_the_chooser():
    """A server that loads a new map (or a compiled model that falls back twice) wraps again: the
    new chooser answers, the layers are wrapped once, the weights are the model's own."""
    model, cfg = build("llama")
    first, second = [], []
    apply_schedules(model, lambda layout: first.append(layout) or Schedule())
    apply_schedules(model, lambda layout: second.append(layout) or Schedule())
    ids = torch.randint(0, COMMON["vocab_size"], (ROWS, PROMPT))
    with torch.no_grad():
        model(input_ids=ids)
    assert not first and len(second) == cfg.num_hidden_layers
    assert all(not isinstance(layer.layer, ScheduledDecoderLayer) for layer in decoder_layers(model))


def test_hf_mixtral_counts_and_its_op_level_schedules_equal_the_model():
    """hf:mixtral's graph has pieces that return a parameter as it is; counting its FLOPs (torch's
    module tracker asserted on such an output) and random schedules of it work, equal to the model."""
    import optuna

    from dynaflow.runtime import Bench, MeasureConfig, TrialOutcome, Workload
    from dynaflow.search_spaces import SpaceContext, get_space

    bench = Bench(Workload(model="hf:mixtral", num_decode=6, context_len=16), config=MeasureConfig(warmup=0, repeats=1))
    assert bench.flops > 0  # counted (op classes are not asserted: they follow the measured peaks)
    ctx = SpaceContext(hardware=bench.hardware, graph=bench.executor.graph, layout=bench.case.layout)
    study, space, seen = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)), get_space("nanoflow"), 0
    for _ in range(6):
        schedule = space(study.ask(), ctx)
        m = bench.measure(schedule)
        assert m.outcome in (TrialOutcome.OK, TrialOutcome.INVALID), (schedule.label, m.message)
        seen += m.ok and not schedule.is_sequential
    assert seen >= 2


def test_tuned_share_counts_only_what_runs_split():
    """Issue 47, point 8: a map answering every batch with a split schedule; with the default
    (dynamic) cache every layer runs unsplit, and the map's tuned share says 0, not 1; with a
    StaticCache (the README's example) every call splits and the share is 1."""
    from dynaflow.runtime import ScheduleMap

    class SplitMap(ScheduleMap):
        def pick(self, layout, context_len=0):
            self.rule_counts["exact"] += 1
            return dbo_policy(layout)

    model, cfg = build("llama")
    ids = torch.randint(0, COMMON["vocab_size"], (ROWS, PROMPT))
    smap = SplitMap([])
    apply_schedules(model, smap)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
    assert smap.unsplit == cfg.num_hidden_layers and smap.tuned_share() == 0.0
    static = SplitMap([])
    apply_schedules(model, static)
    generate(model, cfg, ids)
    assert static.unsplit == 0 and static.tuned_share() == 1.0
    assert all(layer.split_calls == STEPS + 1 for layer in decoder_layers(model))
