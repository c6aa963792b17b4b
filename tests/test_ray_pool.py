"""Trials fanned out over Ray actors: crashes and hangs cost one trial, hardware types get their
own studies, impossible worker counts are refused at once. One small cluster for the module."""
import os
import shutil
from pathlib import Path

import optuna
import pytest

from dynaflow import search_spaces
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.tuner.config import TuneConfig
from dynaflow.tuner.ray_fanout import PoolConfig
from dynaflow.tuner.tune import tune
from fakes import A100, H100, PoisonFake, make_gpu_typed_fake, make_poison_fake, tiny_context
from test_tuner import W

ray = pytest.importorskip("ray")
TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS}})
    yield
    ray.shutdown()


@pytest.fixture
def faulty_space(monkeypatch, tmp_path):
    shutil.copy(Path(TESTS) / "faulty_space.py", tmp_path / "faulty.py")
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])


def config(tmp_path, **kw):
    base = dict(workloads=(W,), space="faulty", trials=12, storage=f"sqlite:///{tmp_path}/s.db",
                store_root=tmp_path, progress=False, trial_timeout_s=1.0)
    return TuneConfig(**{**base, **kw})


def _search(storage):
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    return [t for t in study.trials if not t.user_attrs.get("baseline")]


def test_crash_and_hang_cost_one_trial_each(tmp_path, faulty_space):
    logs = []
    cfg = config(tmp_path / "ray")
    [result] = tune(cfg, make_target=make_poison_fake, log=logs.append,
                    pool=PoolConfig(workers=2, grace_s=4.0))  # a death is seen long before a hang expires
    trials = _search(cfg.storage.url)
    assert len(trials) == 12  # the budget was met despite the poison
    by_label = {t.user_attrs["result"]["label"]: t for t in trials}
    assert by_label["poison-exit"].user_attrs["result"]["outcome"] == "crashed"
    assert "worker died" in by_label["poison-exit"].user_attrs["result"]["message"]
    assert by_label["poison-hang"].user_attrs["result"]["outcome"] == "timeout"
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 10  # every other trial completed; none lost
    assert {t.user_attrs["result"]["worker"] for t in complete} >= {"w0", "w1"}  # both workers measured
    assert {t.user_attrs["result"]["worker"] for t in complete} <= {"w0", "w1", "w0'", "w1'", "driver"}
    assert any("trial(s) by worker" in line and "crashed 1" in line and "timeout 1" in line for line in logs)

    # the same winner as a single-process run on the same landscape
    ref_cfg = config(tmp_path / "single")
    [ref] = tune(ref_cfg, make_target=lambda w: PoisonFake(tiny_context(), die=False), log=lambda *a: None)
    assert result.record.schedule == ref.record.schedule and result.record.schedule.label == "cand2"
    assert result.record.speedup == pytest.approx(ref.record.speedup)


def test_two_gpu_types_get_two_studies(tmp_path):
    cfg = config(tmp_path, space="dbo", trials=4)
    results = tune(cfg, make_target=make_gpu_typed_fake, log=lambda *a: None,
                   pool=PoolConfig(workers=2, use_gpus=True))
    assert sorted(r.record.hardware.key for r in results) == sorted([H100.key, A100.key])
    names = optuna.get_all_study_names(cfg.storage.url)
    assert sorted(n.split("/")[0] for n in names) == sorted([H100.key, A100.key])
    for name in names:  # each study's trials ran only on its own hardware type
        study = optuna.load_study(study_name=name, storage=cfg.storage.url)
        workers = {t.user_attrs["result"]["worker"] for t in study.trials
                   if (t.user_attrs["result"].get("worker") or "driver") != "driver"}
        assert len(workers) == 1
    stored = [p.parent.name for p, _ in ScheduleStore(StoreConfig(root=tmp_path)).records()]
    assert sorted(stored) == sorted([H100.key, A100.key])
    spans = []  # the two types searched at the same time, not one after the other
    for name in names:
        searched = [t for t in optuna.load_study(study_name=name, storage=cfg.storage.url).trials
                    if not t.user_attrs.get("baseline")]
        spans.append((min(t.datetime_start for t in searched), max(t.datetime_complete for t in searched)))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1


def test_impossible_worker_count_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match=r"--workers 3 needs 3 GPU\(s\), but the Ray cluster has 2"):
        tune(config(tmp_path, space="dbo"), make_target=make_gpu_typed_fake, log=lambda *a: None,
             pool=PoolConfig(workers=3, use_gpus=True))


def test_bad_worker_count_names_the_flag():
    with pytest.raises(ValueError, match="--workers must be a positive count or 'all', but got 0"):
        PoolConfig(workers=0)
