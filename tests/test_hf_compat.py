"""The transformers range: declared once, checked at run time, and the drift it bridges."""
import logging
import os
import re
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from dynaflow.runtime import cache_kwargs
from dynaflow.runtime.hf import compat as hf_compat
from dynaflow.runtime.hf import module_path
from dynaflow.runtime.hf import apply_schedules

transformers = pytest.importorskip("transformers")
PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def declared(name: str) -> Requirement:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + [r for rs in project["optional-dependencies"].values()
                                                                for r in rs]]
    return next(r for r in reqs if r.name == name)


def test_the_declared_transformers_range_is_the_one_the_runtime_checks():
    assert str(declared("transformers").specifier) == str(
        Requirement(f"transformers{hf_compat.TESTED_TRANSFORMERS}").specifier)
    assert hf_compat.oldest_transformers() == "5.16.1"


@pytest.mark.parametrize("name", ["transformers", "torch", "optuna", "ray"])
def test_each_dependency_whose_internals_we_use_has_a_tested_upper_bound(name):
    spec = declared(name).specifier
    assert any(s.operator == "<=" for s in spec) and any(s.operator == ">=" for s in spec), spec


def test_the_installed_transformers_is_a_tested_one():
    """Run by scripts/test.sh at the range's newest (the install) and again at its oldest (an overlay)."""
    assert hf_compat.in_tested_range(transformers.__version__), transformers.__version__
    expected = os.environ.get("DYNAFLOW_EXPECT_TRANSFORMERS")
    if expected:  # the overlay took effect: this run really is at the oldest release
        assert transformers.__version__ == expected


def test_the_installed_torch_is_in_the_declared_range():
    """Run by scripts/test.sh with the torch setup.sh installs and again with the range's newest (an overlay)."""
    from packaging.version import Version

    assert Version(torch.__version__.split("+")[0]) in declared("torch").specifier, torch.__version__
    expected = os.environ.get("DYNAFLOW_EXPECT_TORCH")
    if expected:  # the overlay took effect: this run really is at the newest release
        assert torch.__version__.split("+")[0] == expected


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_an_untested_transformers_warns_once_naming_both_versions(monkeypatch, caplog):
    real = hf_compat.importlib.metadata.version
    monkeypatch.setattr(hf_compat.importlib.metadata, "version",
                        lambda name: "4.57.6" if name == "transformers" else real(name))
    monkeypatch.setattr(hf_compat, "_checked", [])
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        apply_schedules(tiny_llama(), lambda layout: None)
        apply_schedules(tiny_llama(), lambda layout: None)
    said = [r.getMessage() for r in caplog.records if "outside the range" in r.getMessage()]
    assert len(said) == 1
    assert "transformers 4.57.6" in said[0] and hf_compat.TESTED_TRANSFORMERS in said[0]


def test_a_tested_transformers_says_nothing(caplog):
    hf_compat._checked.clear()
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        apply_schedules(tiny_llama(), lambda layout: None)
    assert not [r for r in caplog.records if "outside the range" in r.getMessage()]


@pytest.mark.parametrize("version,tested", [("5.16.1", True), ("5.24.0", True), ("5.16.0", False),
                                            ("5.25.0", False), ("4.57.6", False), ("not-a-version", False)])
def test_the_range_check(version, tested):
    assert hf_compat.in_tested_range(version) is tested


def test_the_cache_goes_under_the_name_the_installed_release_takes(recwarn):
    model = tiny_llama()
    name = "cache" if re.match(r"5\.(2[4-9]|[3-9]\d)", transformers.__version__) else "past_key_values"
    assert list(cache_kwargs(model, "c")) == [name]

    class Wrapped(transformers.LlamaForCausalLM):  # a forward of *args, **kwargs is read through its bases
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert list(cache_kwargs(Wrapped(model.config), "c")) == [name]
    cache = transformers.StaticCache(config=model.config, max_cache_len=4)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)
    assert int(cache.get_seq_length()) == 2  # the model took the cache under that name
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


class Node:
    def __init__(self, path):
        self.meta = {"nn_module_stack": {"k": (path, object)}}


@pytest.mark.parametrize("path", ["L['self'].model.layers.0.input_layernorm",
                                  "L['args'][0].model.layers.0.input_layernorm"])
def test_dynamo_module_paths_lose_the_traced_root_however_dynamo_names_it(path):
    assert module_path(Node(path)) == "model.layers.0.input_layernorm"
    assert module_path(Node(path.split(".model")[0])) == "model"


def test_a_decode_step_is_recorded_with_its_context_whatever_the_cache_argument_is_called():
    """transformers 5.24 passes the cache to the layers as `cache`: a layer that looked only for
    `past_key_values` recorded decode steps without their context (d5x1, not d5x8)."""
    from dynaflow.runtime import Schedule, recorded_shapes

    model = tiny_llama()
    apply_schedules(model, lambda layout: Schedule())
    cache = transformers.StaticCache(config=model.config, max_cache_len=10)
    cache.early_initialization(5, 1, 8, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        out = model(input_ids=torch.zeros(5, 7, dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)
        model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
    decode = [b for b in recorded_shapes(model).calls if b.num_decode]
    assert [(b.num_decode, b.context_len) for b in decode] == [(5, 8)]


@pytest.mark.parametrize("version,broken", [("5.17.0", False), ("5.18.0", True), ("5.19.0", True), ("5.20.0", False),
                                            ("5.24.0", False)])
def test_the_releases_whose_mask_code_breaks_dynamo_are_named(version, broken):
    note = hf_compat.whole_graph_note(version)
    assert (note is not None) is broken
    if broken:
        assert f"transformers {version}" in note and "5.20-5.24" in note
