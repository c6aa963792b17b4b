"""End to end on the CPU backend: tune, store, reload, re-measure."""
import json
import statistics

from dynaflow.runtime import Bench, MeasureConfig, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.tuner.cli import main


def test_tune_writes_a_valid_record_that_a_fresh_measurement_matches(tmp_path, capsys):
    args = ["tune", "--model", "llama-small", "--workload", "d8x64+p32", "--space", "dbo", "--trials", "6",
            "--repeats", "8", "--storage", f"sqlite:///{tmp_path}/s.db", "--store", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    [path] = list((tmp_path / "schedules").glob("*/*.json"))
    assert str(path) in out
    rec = ScheduleStore(StoreConfig(root=tmp_path)).read(path)
    w = Workload(model="llama-small", num_decode=8, context_len=64, prefill_tokens=32)
    assert rec.workload == w and path.stem == w.key and path.parent.name == rec.hardware.key
    bench = Bench(w, config=MeasureConfig(warmup=2, repeats=15))
    bench.executor.compile(rec.schedule, sm_count=bench.hardware.num_sms)  # validates against the model
    fresh = [bench.measure(rec.schedule) for _ in range(3)]
    fresh_tps = statistics.median(m.tokens_per_s for m in fresh)
    fresh_spread = statistics.median(m.spread for m in fresh)
    # both numbers are medians of noisy samples: they must agree within the two spreads together
    assert abs(fresh_tps - rec.tokens_per_s) / rec.tokens_per_s <= rec.speedup_spread + fresh_spread
    data = json.loads(path.read_text())
    assert data["record_schema"] == 1 and data["schedule"]["schema_version"] == 1
    assert data["hardware"]["software"]["torch"]


def test_list_prints_the_stored_table(tmp_path, capsys):
    assert main(["list", "--store", str(tmp_path)]) == 0
    assert "no stored schedules" in capsys.readouterr().out


def test_ray_flags_are_checked_at_the_edge(capsys):
    assert main(["tune", "--ray-address", "ray://x:1", "--trials", "1"]) == 2
    assert "--ray-address needs --workers" in capsys.readouterr().err
    assert main(["tune", "--workers", "many", "--trials", "1"]) == 2
    assert "--workers must be a positive count or 'all', but got 'many'" in capsys.readouterr().err
