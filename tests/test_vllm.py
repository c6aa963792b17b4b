"""The vLLM plugin, on vLLM's CPU build: off without its switch, the private names it relies on
checked, each step's nano-batches equal to vLLM without the plugin (greedy tokens identical,
log-probabilities within the derived tolerance) for Llama and Qwen2 under random schedules, and
every bad configuration one warning with vLLM serving sequential.

vLLM needs its own transformers range, so scripts/test.sh runs this file again in an overlay
that has vLLM (DYNAFLOW_EXPECT_VLLM=1 there: a missing vLLM fails instead of skipping)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("DYNAFLOW_EXPECT_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test.sh runs this file with it)")
import torch  # noqa: E402

from dynaflow.runtime import Schedule, StreamSpec, Workload  # noqa: E402
from dynaflow.runtime.hardware import detect  # noqa: E402
from dynaflow.runtime.measure import Tolerance  # noqa: E402
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


def serve(model: Path, tmp: Path, name: str, **env: str) -> dict:
    """The driver's results, with the plugin's report (when it ran) and the engine's log."""
    clean = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    report = tmp / f"{name}.report.json"
    clean.update(env, DYNAFLOW_VLLM_REPORT=str(report), VLLM_CPU_CI_ENV="0",
                 PYTHONPATH=os.pathsep.join([str(HERE), clean.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = tmp / f"{name}.json"
    run = subprocess.run([sys.executable, str(HERE / "vllm_driver.py"), str(model), str(out)], env=clean,
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
    with pytest.raises(RuntimeError, match=r"written for vLLM 0\.32 and does not know this vLLM \(.*\): it lacks "
                                           r"vllm\.forward_context\.get_forward_context_v2"):
        hooks.check()


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_random_schedules_give_vllms_tokens(models, plain, tmp_path, name):
    schedules = tmp_path / "schedules.jsonl"
    got = serve(models[name], tmp_path, f"random-{name}", DYNAFLOW_VLLM_POLICY="vllm_policies:random_schedules",
                DYNAFLOW_TEST_SCHEDULES=str(schedules))
    want = plain[name]
    assert got["tokens"] == want["tokens"]
    tol = _logprob_tolerance(want["logprobs"])
    flat = lambda rows: torch.tensor([x for row in rows for x in row])  # noqa: E731
    assert tol.error(flat(got["logprobs"]), flat(want["logprobs"])) <= 1
    distinct = {line for line in schedules.read_text().splitlines()}
    assert len(distinct) >= 20, f"only {len(distinct)} distinct schedules ran"
    report = got["report"]
    assert report["steps_split"] >= 20, report
    assert "split into nano-batches" in got["log"]


@pytest.mark.slow
def test_a_split_the_step_cannot_take_runs_sequential_and_says_why_once(models, plain, tmp_path):
    got = serve(models["llama"], tmp_path, "inside", DYNAFLOW_VLLM_POLICY="vllm_policies:cut_inside_a_request")
    assert got["tokens"] == plain["llama"]["tokens"]
    said = [line for line in got["log"].splitlines() if "a step runs sequential" in line]
    assert said and all("inside a request" in line for line in said)
    assert len(said) == len(set(s.split("dynaflow:", 1)[1] for s in said))  # each reason once


def _record(model: str, hardware, sizes=(2, 2)) -> StoredSchedule:
    w = Workload(model=model, num_decode=4, context_len=64, dtype="float32", device="cpu")
    return StoredSchedule(hardware=hardware, workload=w, schedule=Schedule(split_sizes=sizes, streams=(StreamSpec(),)),
                          verdict="winner", tokens_per_s=1.0, baseline_tokens_per_s=1.0, speedup=1.2,
                          speedup_spread=0.01, efficiency=0.5, space="nanoflow")


@pytest.mark.slow
def test_bad_stores_are_one_warning_and_vllm_serves_sequential(models, plain, tmp_path):
    store = ScheduleStore(StoreConfig(root=tmp_path / "store"))
    store.save(_record("vllm:llama", H100))  # tuned on other hardware
    other = serve(models["llama"], tmp_path, "other", DYNAFLOW_VLLM_SCHEDULES=str(tmp_path / "store"))
    assert other["tokens"] == plain["llama"]["tokens"] and other["report"]["steps_split"] == 0
    said = re.search(r"no stored schedules for vllm:llama float32 on (\S+): .* holds no records for this hardware "
                     r"\(only for cuda-nvidia-h100", other["log"])
    assert said, other["log"][-3000:]
    live = said.group(1)  # the hardware vLLM's worker sees (its CPU threads are vLLM's to set)

    folder = tmp_path / "store" / "schedules" / live
    folder.mkdir(parents=True)
    (folder / "vllm-llama_d4x64_p0_fp32.json").write_text('{"record_schema": 3, "hard')  # cut off mid-write
    corrupt = serve(models["llama"], tmp_path, "corrupt", DYNAFLOW_VLLM_SCHEDULES=str(tmp_path / "store"))
    assert corrupt["tokens"] == plain["llama"]["tokens"] and corrupt["report"]["steps_split"] == 0
    assert "vllm-llama_d4x64_p0_fp32.json" in corrupt["log"] and "is not valid JSON" in corrupt["log"]

    missing = serve(models["llama"], tmp_path, "missing", DYNAFLOW_VLLM_SCHEDULES=str(tmp_path / "nowhere"))
    assert missing["tokens"] == plain["llama"]["tokens"]
    assert "is not a folder" in missing["log"] and "every step runs sequential" in missing["log"]
    # vLLM prints a traceback of its own (no tokenizer to warm up); none may pass through the plugin
    assert not re.search(r'File ".*dynaflow|File ".*/runtime/vllm/', other["log"] + corrupt["log"] + missing["log"])
