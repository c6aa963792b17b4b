"""End to end on the CPU backend: tune, store, reload, re-measure."""
import json
import re
import statistics
from pathlib import Path

import optuna
import pytest

from dynaflow.runtime import Bench, MeasureConfig, Workload
from dynaflow.runtime.measure import relative_spread
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.tuner.cli import main
from dynaflow.tuner.paired import round_ms


def _tune(tmp_path, model: str, workload: str, capsys) -> tuple[Path, StoredSchedule]:
    args = ["tune", "--model", model, "--workload", workload, "--space", "dbo", "--trials", "6",
            "--confirm-rounds", "6", "--repeats", "8", "--storage", f"sqlite:///{tmp_path}/s.db", "--store", str(tmp_path), "--no-progress",
            "--no-model"]  # the record's claims, not the model's (the README's main job tunes with it)
    assert main(args) == 0
    out = capsys.readouterr().out
    [path] = list((tmp_path / "schedules").glob("*/*.json"))
    assert str(path) in out
    return path, ScheduleStore(StoreConfig(root=tmp_path)).read(path)


def test_tune_on_a_built_in_preset_writes_a_valid_record_of_a_correct_schedule(tmp_path, capsys):
    path, rec = _tune(tmp_path, "llama-small", "d8x64+p32", capsys)
    w = Workload(model="llama-small", num_decode=8, context_len=64, prefill_tokens=32)
    assert rec.workload == w and path.stem == w.key and path.parent.name == rec.hardware.key
    data = json.loads(path.read_text())
    assert data["record_schema"] == 4 and data["schedule"]["schema_version"] == 1
    assert data["hardware"]["software"]["torch"]
    # how busy the machine was over the confirmation, and whether that counts as contention
    assert data["busy"]["wall_s"] > 0 and data["busy"]["cpus"] >= 1 and "others_cpu_s" in data["busy"]
    assert data["contended"] is None  # busy rounds are no evidence unless --accept-contention
    assert (data["rounds"] or 0) + data["busy_rounds"] >= 1  # paired rounds were measured, quiet or busy
    assert (data["overlap"] is not None) == (rec.verdict == "winner")  # a winner says what overlapped
    # the record is one confirmation: its numbers agree with each other and with the study's verdict
    assert rec.tokens_per_s == pytest.approx(rec.baseline_tokens_per_s * rec.speedup)
    assert rec.efficiency is not None and 0 < rec.efficiency <= 1
    study = optuna.load_study(study_name=rec.study, storage=rec.storage)
    assert study.user_attrs["confirmation"]["sequential_best"] == rec.sequential_best
    bench = Bench(w, config=MeasureConfig(warmup=1, repeats=3))
    fresh = bench.measure(rec.schedule)  # verifies against the sequential reference first
    assert fresh.ok, fresh.summary()
    # no timing is compared across runs (a shared 2-core machine moves them by 5x); units are:
    # tokens/s is the workload's tokens over the median latency, in the fresh run and the record
    assert fresh.tokens_per_s == pytest.approx(w.num_tokens / fresh.latency_ms * 1e3)
    confirmation = study.user_attrs["confirmation"]  # one estimator: the record's sequential figure is the rounds'
    assert rec.baseline_tokens_per_s == pytest.approx(w.num_tokens / confirmation["baseline_ms"] * 1e3)
    every = [r for c in confirmation["candidates"] for r in c["comparison"]["rounds"]]
    if confirmation["best"] is None:  # no candidate had a quiet round (a busy machine): every round's baseline
        baselines = [r["baseline_ms"] for r in every]
    else:
        best = confirmation["candidates"][confirmation["best"]]
        baselines = [r["baseline_ms"] for r in best["comparison"]["rounds"] if not r["busy"]]
    assert confirmation["baseline_ms"] == pytest.approx(statistics.median(baselines))


def test_tuned_numbers_match_a_fresh_measurement_within_the_recorded_spread(tmp_path, capsys):
    """The paced model sleeps like a kernel runs, so its timings hold on a loaded machine: a fresh
    measurement of the stored schedule agrees with the record's figure within the spreads of both:
    the fresh measurement's, the record's speedup's, and that of the sequential figures the record's
    one is the median of (its confirmation's rounds: on a loaded CI machine these moved 3.6% while
    a measurement's own samples spread 2.2%)."""
    path, rec = _tune(tmp_path, "user_models:paced_block", "d16x0", capsys)
    w = Workload(model="user_models:paced_block", num_decode=16)
    assert rec.workload == w
    bench = Bench(w, config=MeasureConfig(warmup=2, repeats=15))
    fresh = [bench.measure(rec.schedule) for _ in range(3)]
    assert all(m.ok for m in fresh)
    fresh_tps = statistics.median(w.num_tokens / round_ms(m.samples_ms) * 1e3 for m in fresh)  # the record's estimator
    fresh_spread = statistics.median(m.spread for m in fresh)
    confirmation = optuna.load_study(study_name=rec.study, storage=rec.storage).user_attrs["confirmation"]
    rounds = [r["baseline_ms"] for c in confirmation["candidates"] for r in c["comparison"]["rounds"]]
    assert len(rounds) >= 2  # the record's sequential figure is a median of rounds
    rounds_spread = relative_spread(rounds)
    assert abs(fresh_tps - rec.tokens_per_s) / rec.tokens_per_s <= rec.speedup_spread + fresh_spread + rounds_spread, \
        (rec.schedule, rec.tokens_per_s, rec.speedup, rec.speedup_spread, rounds, [m.to_dict() for m in fresh])
    # idle, two nano-batches on two threads overlap their sleeps (~1.7x stored); under load the
    # noise hides that and sequential is stored: both are valid records, so neither is asserted


def test_list_prints_the_stored_table(tmp_path, capsys):
    assert main(["list", "--store", str(tmp_path)]) == 0
    assert "no stored schedules" in capsys.readouterr().out


def test_ray_flags_are_checked_at_the_edge(capsys):
    assert main(["tune", "--ray-address", "ray://x:1", "--trials", "1"]) == 2
    assert "--ray-address needs --workers" in capsys.readouterr().err
    assert main(["tune", "--workers", "many", "--trials", "1"]) == 2
    assert "--workers must be a positive count or 'all', but got 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["tune", "measure", "ops", "report", "list"])
def test_help_documents_every_flag_and_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"default: [^()]*\) \(default:", text), text  # argparse's default after our own
    parser = __import__("dynaflow.tuner.cli", fromlist=["build_parser"]).build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
