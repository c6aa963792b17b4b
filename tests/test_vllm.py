"""The vLLM plugin, on vLLM's CPU build: off without its switch, the private names it relies on
checked, each step's nano-batches equal to vLLM without the plugin (greedy tokens identical,
log-probabilities within the derived tolerance) for Llama and Qwen2 under random schedules, and
every bad configuration one warning with vLLM serving sequential.

vLLM needs its own transformers range, so scripts/test.sh runs this file again in an overlay
that has vLLM (DYNAFLOW_EXPECT_VLLM=1 there: a missing vLLM fails instead of skipping)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

if os.environ.get("DYNAFLOW_EXPECT_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test.sh runs this file with it)")
import torch  # noqa: E402

from dynaflow.runtime import Schedule, Step, StreamSpec, Workload  # noqa: E402
from dynaflow.runtime.hardware import detect  # noqa: E402
from dynaflow.runtime.measure import Tolerance  # noqa: E402
from dynaflow.runtime.shapes import Bucket, ShapeLog, candidates  # noqa: E402
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule  # noqa: E402
from fakes import H100  # noqa: E402

HERE = Path(__file__).parent
PLUGIN_ENV = ("DYNAFLOW_VLLM_SCHEDULES", "DYNAFLOW_VLLM_POLICY", "DYNAFLOW_VLLM_MODEL", "DYNAFLOW_VLLM_SHAPES",
              "DYNAFLOW_VLLM_REPORT", "VLLM_USE_AOT_COMPILE")
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight Llama and Qwen2 folders vLLM can serve (save_pretrained; nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, config, cls in (("llama", LlamaConfig, LlamaForCausalLM), ("qwen2", Qwen2Config, Qwen2ForCausalLM)):
        torch.manual_seed(0)
        cls(config(**CONFIG)).save_pretrained(root / name)
        out[name] = root / name
    return out


def serve(model: Path, tmp: Path, name: str, llm_args: dict | None = None, **env: str) -> dict:
    """The driver's results, with the plugin's report (when it ran) and the engine's log;
    `llm_args`: more of LLM's arguments."""
    clean = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    report = tmp / f"{name}.report.json"
    clean.update(env, DYNAFLOW_VLLM_REPORT=str(report), VLLM_CPU_CI_ENV="0",
                 PYTHONPATH=os.pathsep.join([str(HERE), clean.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = tmp / f"{name}.json"
    run = subprocess.run([sys.executable, str(HERE / "vllm_driver.py"), str(model), str(out),
                          json.dumps(llm_args or {})], env=clean,
                         capture_output=True, text=True, timeout=420)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    result = json.loads(out.read_text())
    result["report"] = json.loads(report.read_text()) if report.exists() else None
    result["log"] = log
    return result


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory) -> dict[str, dict]:
    """vLLM without the plugin, per model: the reference."""
    tmp = tmp_path_factory.mktemp("plain")
    return {name: serve(path, tmp, f"plain-{name}") for name, path in models.items()}


def test_the_private_names_the_plugin_relies_on_exist_in_this_vllm():
    from dynaflow.runtime.vllm import hooks
    hooks.check()


def test_a_vllm_that_changed_a_name_is_one_clear_message(monkeypatch):
    from dynaflow.runtime.vllm import hooks
    monkeypatch.setattr(hooks, "NAMES", hooks.NAMES + (("vllm.forward_context", "get_forward_context_v2"),))
    with pytest.raises(RuntimeError, match=r"written for vLLM 0\.32-0\.33 and does not know this vLLM \(.*\): it lacks "
                                           r"vllm\.forward_context\.get_forward_context_v2"):
        hooks.check()


class _StatefulBuilder:
    """A metadata builder that keeps state of its last build, as GPU backends' may (persistent
    CUDA-graph buffers, FlashInfer's planned wrappers): metadata it built before its latest build
    is stale. The rule vLLM's micro-batches follow, a builder per micro-batch, is what keeps
    the nano-batches of one plan valid together."""

    def __init__(self, name: str) -> None:
        self.name, self.builds = name, 0

    def build(self, common_prefix_len, cm):
        self.builds += 1
        return {"builder": self, "generation": self.builds, "requests": cm.num_reqs, "tokens": cm.num_actual_tokens,
                "query_start_loc": cm.query_start_loc_cpu.tolist(), "seq_lens": cm.seq_lens.tolist(),
                "positions": None if cm.positions is None else cm.positions.tolist()}


@dataclasses.dataclass
class _Group:
    """vLLM's AttentionGroup as the plugin uses it: layers, builders made per slot, build_metadata."""

    layer_names: list
    kernel_block_size: int | None = None
    metadata_builders: list = dataclasses.field(default_factory=list)
    made: list = dataclasses.field(default_factory=list)

    def create_metadata_builders(self, vllm_config, device, kernel_block_size=None, num_metadata_builders=1):
        self.metadata_builders = [_StatefulBuilder(f"spare{i}") for i in range(num_metadata_builders)]
        self.made.append(num_metadata_builders)

    def get_metadata_builder(self, i=0):
        return self.metadata_builders[i]

    def build_metadata(self, cm, ubatch_idx=0, common_prefix_len=0, **kwargs):
        return self.get_metadata_builder(ubatch_idx).build(common_prefix_len, cm)


def _valid(md) -> bool:
    return md["generation"] == md["builder"].builds


def _step(requests=(1, 1, 5, 3)):
    """A step's StepAttention over a fake runner: two layers in one attention group, requests of
    `requests` tokens, vLLM's own builder for the whole step."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from dynaflow.runtime.vllm import hooks
    qsl = torch.tensor([0, *itertools.accumulate(requests)], dtype=torch.int32)
    n, t = len(requests), int(qsl[-1])
    seq = torch.tensor([40 + 10 * i for i in range(n)], dtype=torch.int32)
    cm = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=n,
                                 num_actual_tokens=t, max_query_len=max(requests), max_seq_len=int(seq.max()),
                                 block_table_tensor=torch.arange(n * 4, dtype=torch.int32).view(n, 4),
                                 slot_mapping=torch.arange(t, dtype=torch.int64), seq_lens_cpu_upper_bound=seq,
                                 positions=torch.arange(100, 100 + t), is_prefilling=torch.tensor([False] * n))
    group = _Group(layer_names=["layers.0.attn", "layers.1.attn"], metadata_builders=[_StatefulBuilder("vllm")])
    runner = types.SimpleNamespace(attn_groups=[[group]], vllm_config=None, device="cpu", speculative_config=None)
    whole = group.build_metadata(cm)
    return hooks.StepAttention(runner=runner, built={"layers.0.attn": whole, "layers.1.attn": whole},
                               groups=[(group.layer_names, cm)]), whole


def test_each_nano_batch_is_built_by_its_own_slots_builder():
    """Nano-batches on request boundaries, uneven, any number: each one's metadata is vLLM's split of
    the step's (its requests, tokens, sequence lengths, positions) built by the builder of its slot,
    never vLLM's own; all of one plan's stay valid together, and so does the whole step's."""
    step, whole = _step()
    for ranges in ([(0, 1), (1, 4)], [(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]):
        built = [step.nano(b, r0, r1) for b, (r0, r1) in enumerate(ranges)]
        for (r0, r1), md in zip(ranges, built):
            m = md["layers.0.attn"]
            assert md["layers.1.attn"] is m  # the group's layers share their metadata, as in vLLM
            tokens = step.tokens(r0, r1)
            assert m["requests"] == r1 - r0 and m["tokens"] == tokens.stop - tokens.start
            assert m["seq_lens"] == [40 + 10 * i for i in range(r0, r1)]
            assert m["positions"] == list(range(100 + tokens.start, 100 + tokens.stop))
            assert m["query_start_loc"][0] == 0 and m["query_start_loc"][-1] == m["tokens"]
        assert len({id(md["layers.0.attn"]["builder"]) for md in built}) == len(ranges)
        assert all(md["layers.0.attn"]["builder"].name != "vllm" for md in built)
        assert all(_valid(md["layers.0.attn"]) for md in built) and _valid(whole)


def test_a_step_vllm_split_fields_would_drop_runs_sequential():
    from dynaflow.runtime.vllm import hooks
    step, _ = _step()
    cm = step.groups[0][1]
    assert step.why_not() is None
    for field, value in (("encoder_seq_lens", torch.ones(4)), ("causal", False), ("dcp_local_seq_lens", torch.ones(4))):
        bad = dataclasses.replace(step, groups=[(["layers.0.attn"], dataclasses.replace(cm, **{field: value}))])
        assert f"sets {field}, which vLLM's micro-batch split" in bad.why_not()
    # metadata vLLM did not build through its model runner's _build_attention_metadata: said so
    assert "outside GPUModelRunner._build_attention_metadata" in hooks.step_attention({"other": 1})


def test_a_kept_step_rebuilds_a_slot_whose_range_changed(monkeypatch):
    """Tuning replays a kept step under one schedule after another: a slot's builder rebuilds when
    its nano-batch's range changes, so the metadata a plan runs with is always its builder's latest."""
    from dynaflow.tuner.vllm_engine import KeptStep
    step, _ = _step()
    kept = step.kept()
    assert kept.groups[0][1].query_start_loc_cpu is not step.groups[0][1].query_start_loc_cpu  # the step's values copied
    seen = {}

    class Runner:
        gm = sequential = None

        def case(self, inputs, layout, nano_metadata, model):
            seen["nano_metadata"] = nano_metadata
            return types.SimpleNamespace(name="", sequential=None)

    from dynaflow.runtime.batch import BatchLayout
    layout = BatchLayout(request_tokens=(1, 1, 5, 3), request_kinds=("decode", "decode", "prefill", "prefill"),
                         input_axes=(), kinds=("decode", "prefill"))
    ks = KeptStep(runner=Runner(), inputs=(), layout=layout, context_len=70, ctx=None, metadata={}, slots=None,
                  attention=kept)
    ks.case("t")
    got = []
    from dynaflow.runtime.vllm import hooks
    monkeypatch.setattr(hooks, "replayed_context", lambda ctx, md, slots: got.append(md["layers.0.attn"]))
    nano = seen["nano_metadata"]
    for ranges in ([(0, 2), (2, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 4)], [(0, 2), (2, 4)]):
        got.clear()
        for b, r in enumerate(ranges):
            nano(b, *r)
        assert all(_valid(m) for m in got) and [m["requests"] for m in got] == [r1 - r0 for r0, r1 in ranges]


@pytest.mark.parametrize("mode, graphs, v2, named", [
    ("VLLM_COMPILE", "NONE", False, "compilation mode VLLM_COMPILE"),
    ("DYNAMO_TRACE_ONCE", "FULL", False, "cudagraph_mode FULL"),
    ("DYNAMO_TRACE_ONCE", "NONE", True, "V2 model runner"),
    ("DYNAMO_TRACE_ONCE", "NONE", False, None),
])
def test_a_mode_the_plugin_does_not_cover_is_one_warning_and_vllms_own_backend(monkeypatch, caplog, mode, graphs, v2,
                                                                                named):
    """On a GPU vLLM's defaults (piecewise compilation, CUDA graphs, the V2 model runner) are modes
    the plugin does not cover: one WARNING naming the mode, vLLM's backend returned as it was, and
    its model runner not watched. The covered mode gets the plugin's wrapper."""
    import logging

    from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from dynaflow.runtime.vllm import hooks
    monkeypatch.setattr(CompilationConfig, "init_backend", lambda self, vllm_config: "vllm's backend")
    monkeypatch.setattr(GPUModelRunner, "_build_attention_metadata", GPUModelRunner._build_attention_metadata)
    monkeypatch.setattr(hooks, "UNCOVERED", [])
    hooks.install(lambda backend, vllm_config: ("wrapped", backend))
    cc = types.SimpleNamespace(mode=CompilationMode[mode], cudagraph_mode=CUDAGraphMode[graphs])
    config = types.SimpleNamespace(compilation_config=cc, use_v2_model_runner=v2)
    with caplog.at_level(logging.WARNING, logger="vllm.dynaflow"):
        got = [CompilationConfig.init_backend(cc, config) for _ in range(2)]
    said = [r.getMessage() for r in caplog.records if r.name == "vllm.dynaflow"]
    watched = getattr(GPUModelRunner._build_attention_metadata, "_dynaflow", False)
    if named is None:
        assert got == [("wrapped", "vllm's backend")] * 2 and said == [] and watched
    else:
        assert got == ["vllm's backend"] * 2 and not watched
        assert len(said) == 1 and named in said[0] and "leaves vLLM untouched" in said[0], said


@pytest.mark.slow
@pytest.mark.parametrize("llm_args, mode", [
    ({"enforce_eager": True}, "compilation mode NONE"),
    ({"compilation_config": {"mode": "STOCK_TORCH_COMPILE"}}, "compilation mode STOCK_TORCH_COMPILE"),
])
def test_a_mode_where_vllm_asks_for_no_backend_is_one_warning_from_the_first_step(models, plain, tmp_path, llm_args,
                                                                                   mode):
    """With the switch on, vLLM in eager mode (and the CPU runner in STOCK_TORCH_COMPILE) never
    asks for the compilation backend the plugin wraps: one WARNING from the model runner's first
    step names the mode, and vLLM serves every request as it would (no step split, no runner
    built)."""
    got = serve(models["llama"], tmp_path, "eager", llm_args, DYNAFLOW_VLLM_POLICY="vllm_policies:random_schedules",
                DYNAFLOW_TEST_SCHEDULES=str(tmp_path / "schedules.jsonl"))
    said = [line for line in got["log"].splitlines() if "a mode the plugin does not cover" in line]
    assert len(said) == 1 and mode in said[0] and "leaves vLLM untouched" in said[0], got["log"][-3000:]
    assert [len(t) for t in got["tokens"]] == [len(t) for t in plain["llama"]["tokens"]]  # vLLM served as it would
    assert got["report"] is None and not (tmp_path / "schedules.jsonl").exists()  # no step runner, no step split


@pytest.mark.parametrize("env, words", [
    ({"DYNAFLOW_VLLM_SCHEDULES": "/nowhere/store"}, "DYNAFLOW_VLLM_SCHEDULES='/nowhere/store' is not a folder"),
    ({"DYNAFLOW_VLLM_POLICY": "no_such_module:policy"}, "policy 'no_such_module:policy'"),
])
def test_a_missing_store_or_policy_is_one_warning_and_sequential(monkeypatch, caplog, env, words):
    import logging

    import dynaflow.runtime.vllm as plugin
    from dynaflow.runtime.batch import BatchLayout
    for k in PLUGIN_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    facts = {"model": "/models/llama", "dtype": torch.float32, "device_type": "cpu", "inductor_config": {}}
    with caplog.at_level(logging.WARNING, logger="vllm.dynaflow"):
        chooser = plugin.chooser_for(facts)
    said = [r for r in caplog.records if r.name == "vllm.dynaflow"]
    assert len(said) == 1 and words in said[0].getMessage() and "every step runs sequential" in said[0].getMessage()
    assert chooser.pick(BatchLayout.uniform(8, 1)).is_sequential


def test_without_the_switch_register_changes_nothing(monkeypatch):
    from vllm.config.compilation import CompilationConfig

    import dynaflow.runtime.vllm as plugin
    for k in PLUGIN_ENV:
        monkeypatch.delenv(k, raising=False)
    before = CompilationConfig.init_backend
    plugin.register()
    assert CompilationConfig.init_backend is before and "VLLM_USE_AOT_COMPILE" not in os.environ


def _logprob_tolerance(reference: list[list[float]]) -> Tolerance:
    """The derived bound for the log-probabilities: the model's longest reduction (the MLP's inner
    size, the context) and its depth in ops (20 for 2 layers), float32."""
    ref = torch.tensor([x for row in reference for x in row])
    return Tolerance.derive(torch.float32, reduction=max(CONFIG["intermediate_size"], 512), depth=20, reference=ref)


@pytest.fixture(scope="module")
def randomly(models, tmp_path_factory) -> dict[str, dict]:
    """Per model: vLLM with the plugin under a policy drawing a random schedule at every step."""
    tmp = tmp_path_factory.mktemp("random")
    out = {}
    for name, path in models.items():
        schedules, shapes = tmp / f"{name}.schedules.jsonl", tmp / f"{name}.shapes.json"
        out[name] = serve(path, tmp, f"random-{name}", DYNAFLOW_VLLM_POLICY="vllm_policies:random_schedules",
                          DYNAFLOW_TEST_SCHEDULES=str(schedules), DYNAFLOW_VLLM_SHAPES=str(shapes))
        out[name]["schedules"] = set(schedules.read_text().splitlines())
        out[name]["shapes"] = shapes
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_random_schedules_give_vllms_tokens(plain, randomly, name):
    got, want = randomly[name], plain[name]
    assert got["tokens"] == want["tokens"]
    tol = _logprob_tolerance(want["logprobs"])
    flat = lambda rows: torch.tensor([x for row in rows for x in row])  # noqa: E731
    assert tol.error(flat(got["logprobs"]), flat(want["logprobs"])) <= 1
    assert len(got["schedules"]) >= 20, f"only {len(got['schedules'])} distinct schedules ran"
    report = got["report"]
    assert report["steps_split"] >= 20, report
    assert "split into nano-batches" in got["log"]
    # the policy's cuts inside a request: those steps ran sequential, each reason said once
    said = [line for line in got["log"].splitlines() if "a step runs sequential" in line]
    assert said and all("inside a request" in line for line in said), said
    assert len(said) == len({line.split("dynaflow:", 1)[1] for line in said}) == len(report["sequential_because"])


def _record(model: str, hardware, sizes=(2, 2)) -> StoredSchedule:
    w = Workload(model=model, num_decode=4, context_len=64, dtype="float32", device="cpu")
    return StoredSchedule(hardware=hardware, workload=w, schedule=Schedule(split_sizes=sizes, streams=(StreamSpec(),)),
                          verdict="winner", tokens_per_s=1.0, baseline_tokens_per_s=1.0, speedup=1.2,
                          speedup_spread=0.01, efficiency=0.5, space="nanoflow")


def test_a_store_for_other_hardware_or_a_corrupt_record_is_one_warning_each(monkeypatch, caplog, tmp_path):
    """As the plugin loads a store in vLLM's worker (in-process here: the same call): records only
    for other hardware, and a record cut off mid-write, each one WARNING naming why; every step
    sequential. (A corrupt record beside good ones, in a serving engine: the loop test below.)"""
    import logging

    import dynaflow.runtime.vllm as plugin
    from dynaflow.runtime.batch import BatchLayout
    for k in PLUGIN_ENV:
        monkeypatch.delenv(k, raising=False)
    store = ScheduleStore(StoreConfig(root=tmp_path))
    store.save(_record("vllm:llama", H100))  # tuned on other hardware
    live = detect("cpu").key
    (tmp_path / "schedules" / live).mkdir(parents=True)
    (tmp_path / "schedules" / live / "vllm-llama_d4x64_p0_fp32.json").write_text('{"record_schema": 3, "hard')
    monkeypatch.setenv("DYNAFLOW_VLLM_SCHEDULES", str(tmp_path))
    facts = {"model": "/models/llama", "dtype": torch.float32, "device_type": "cpu", "inductor_config": {}}
    with caplog.at_level(logging.WARNING):
        chooser = plugin.chooser_for(facts)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("vllm-llama_d4x64_p0_fp32.json" in m and "is not valid JSON" in m for m in said), said
    assert any(f"no stored schedules for vllm:llama float32 on {live}" in m for m in said), said
    assert len(said) == 2
    assert chooser.pick(BatchLayout.uniform(8, 1)).is_sequential


@pytest.mark.slow
def test_the_loop_closes_in_vllm(models, plain, randomly, tmp_path):
    """The shapes a serve recorded, tuned on vLLM's own model (`dynaflow-tune tune --model vllm:DIR
    --shapes FILE`: in vLLM's worker, on steps vLLM's scheduler formed), answer the next serve's
    steps: the share answered is the coverage the tuner printed, records found by the model's
    folder name and the worker's hardware key. Their schedules are then made splits (as a GPU's
    tuning would store) with an op order from another graph, and a corrupt record put beside
    them: steps split in the graph's order, tokens identical, the foreign order and the corrupt
    record a warning each."""
    store, live = tmp_path / "store", randomly["llama"]["report"]["hardware"]
    run = subprocess.run([sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", f"vllm:{models['llama']}",
                          "--shapes", str(randomly["llama"]["shapes"]), "--buckets", "3", "--trials", "3",
                          "--confirm-rounds", "1", "--store", str(store), "--storage", f"sqlite:///{tmp_path}/s.db",
                          "--no-progress"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    coverage = float(re.search(r"coverage: ([0-9.]+)% of recorded calls", run.stdout).group(1))
    assert run.stdout.count("\n  stored ") == 3 and "Traceback" not in run.stderr, run.stdout
    records = [rec for _, rec in ScheduleStore(StoreConfig(root=store)).records()]
    assert len(records) == 3 and {r.hardware.key for r in records} == {live}  # measured where vLLM serves
    assert {r.workload.model for r in records} == {f"vllm:{models['llama']}"}

    split = ScheduleStore(StoreConfig(root=store))
    foreign = tuple(Step(op=op, nano=b, stream=b) for op in ("input_layernorm", "mlp") for b in (0, 1))
    # every splittable record gets the foreign order: whichever record a served step picks, a split
    # step meets it (with it on records[0] alone, the warning never came when that bucket held one
    # request or answered no split step: which buckets the tuner chose decided the test)
    for rec in records:
        n = rec.workload.num_decode + rec.workload.num_prefill
        if n < 2:
            continue
        schedule = Schedule(split_sizes=(1, n - 1), streams=(StreamSpec(), StreamSpec()), order=foreign)
        split.save(dataclasses.replace(rec, schedule=schedule, verdict="winner", speedup=1.2))
    (store / "schedules" / live / "vllm-llama_d64x64_p0_fp32.json").write_text('{"record_schema": 3, "hard')  # cut off
    live_shapes = tmp_path / "served.shapes.json"
    served = serve(models["llama"], tmp_path, "tuned", DYNAFLOW_VLLM_SCHEDULES=str(store),
                   DYNAFLOW_VLLM_SHAPES=str(live_shapes))
    assert served["tokens"] == plain["llama"]["tokens"]
    report = served["report"]
    answered = report["answered_by"]
    share = 100 * (sum(answered.values()) - answered.get("sequential", 0)) / sum(answered.values())
    # the served steps a stored bucket answers: the coverage the tuner printed for the recorded ones
    # (the same prompts), and, less the steps of one request, which no split fits, the share served
    steps = ShapeLog.load(live_shapes)
    assert steps.total_calls == sum(answered.values())
    buckets = [Bucket(num_decode=r.workload.num_decode, prefill_tokens=r.workload.prefill_tokens,
                      context_len=r.workload.context_len) for r in records]
    recorded = ShapeLog.load(randomly["llama"]["shapes"])  # what the printed coverage was computed on
    assert abs(100 * sum(n for b, n in recorded.calls.items() if candidates(buckets, b)) / recorded.total_calls
               - coverage) < 0.1, coverage
    hit = {b: n for b, n in steps.calls.items() if candidates(buckets, b)}
    # the same prompts, but vLLM need not form the very same steps twice (one CI run: 2 of 31 steps
    # differed): within 3 steps of the coverage printed
    assert abs(100 * sum(hit.values()) / steps.total_calls - coverage) <= 100 * 3 / steps.total_calls, (hit, coverage)
    splittable = sum(n for b, n in hit.items() if b.num_decode + b.num_prefill >= 2)
    assert share > 50 and abs(share - 100 * splittable / steps.total_calls) < 0.01, (share, coverage, answered)
    assert report["steps_split"] > 0 and report["hardware"] == live
    assert "op order does not fit vLLM's graph" in served["log"]
    assert "vllm-llama_d64x64_p0_fp32.json" in served["log"] and "is not valid JSON" in served["log"]
    # vLLM prints a traceback of its own (no tokenizer to warm up); none may pass through the plugin
    assert not re.search(r'File ".*dynaflow|File ".*/runtime/vllm/', served["log"])
