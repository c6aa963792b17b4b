"""A model prefix (a serving engine's: `hf:`, `vllm:`, a future `sglang:`) is one registration in
the runtime (its case builder and the name its records are stored by) and one in the tuner (its
target, what starts once before the first, whether a Ray pool may run it): a made-up engine
registered here, and nothing else changed, is tuned end to end, its records named as it says."""
import dataclasses
import sys

import optuna
import pytest

from dynaflow.runtime import Workload
from dynaflow.runtime import workload as workloads
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.tuner import targets
from test_hostile_input import one_line, run_cli


class EngineTarget(targets.LocalTarget):
    """The made-up engine measures in this process, on llama-tiny's case, and counts its targets."""
    made: list[str] = []

    def __init__(self, workload, config):
        EngineTarget.made.append(workload.model)
        super().__init__(workload, config)


@pytest.fixture
def engine(monkeypatch):
    tiny = lambda w: dataclasses.replace(w, model="llama-tiny").build()  # noqa: E731
    monkeypatch.setitem(workloads.CASE_BUILDERS, "engine:", tiny)
    monkeypatch.setitem(workloads.MODEL_NAMES, "engine:", workloads.folder_name("engine:"))
    reserved = []
    monkeypatch.setitem(targets.INTEGRATIONS, "engine:", targets.Integration(
        target=EngineTarget, reserve=reserved.append, no_pool="engine: models run in the engine's own process."))
    EngineTarget.made = []
    return reserved


def test_a_registered_prefix_is_named_built_and_measured_where_it_says(engine, tmp_path):
    assert workloads.model_name("engine:./models/tiny") == "engine:tiny"
    w = Workload(model="engine:./models/tiny", num_decode=4, context_len=16)
    assert isinstance(targets.target_for(w, targets.MeasureConfig()), EngineTarget)
    other = Workload(model="llama-tiny", num_decode=4, context_len=16)
    targets.reserve([w, other])
    assert engine == [[w]]  # once, with its own workloads only
    assert type(targets.target_for(other, targets.MeasureConfig())) is targets.LocalTarget


def test_a_registered_engine_is_tuned_end_to_end_and_stored_by_its_name(engine, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    code, out, err = run_cli("tune", "--model", "engine:./models/tiny", "--workload", "d4x16", "--trials", "2",
                             "--confirm-rounds", "5", "--repeats", "3", "--warmup", "1", "--no-progress",
                             "--store", tmp_path, "--storage", storage)
    assert code == 0, err[-2000:]
    assert EngineTarget.made and set(EngineTarget.made) == {"engine:./models/tiny"}
    assert len(engine) == 1  # reserved once before the first target
    records = list(ScheduleStore(StoreConfig(root=tmp_path)).root.rglob("engine-tiny_d4x16_p0_fp32.json"))
    assert len(records) == 1, list(tmp_path.rglob("*.json"))
    assert len(optuna.get_all_study_names(storage)) == 1


def test_an_engine_that_cannot_run_in_a_ray_pool_says_so(engine, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray is needed
    code, out, err = run_cli("tune", "--model", "engine:./models/tiny", "--workload", "d4x16", "--workers", "1",
                             "--trials", "1", "--no-progress", "--store", tmp_path, "--storage",
                             f"sqlite:///{tmp_path}/s.db")
    assert code == 2
    one_line(err, "engine: models run in the engine's own process.")


def test_the_built_in_integrations_are_registrations():
    assert {"hf:", "vllm:"} <= set(workloads.case_builders()) and "vllm:" in workloads.MODEL_NAMES
    assert set(targets.INTEGRATIONS) == {"vllm:"} and targets.INTEGRATIONS["vllm:"].no_pool
