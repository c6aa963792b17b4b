"""The store writes atomically, reads back exactly, and names the file on any defect."""
import dataclasses
import json
from pathlib import Path

import pytest

from dynaflow.runtime import Schedule, StreamSpec, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.tuner.publish import export, import_bundle, save_unless_kept
from dynaflow.tuner.report import stored_table
from fakes import H100
from cli_output import error_lines

W = Workload(model="llama3-8b", num_decode=256, context_len=2048, prefill_tokens=512, dtype="bfloat16",
             device="cuda")


def record(**kw) -> StoredSchedule:
    base = dict(hardware=H100, workload=W, schedule=Schedule(split_sizes=(128, 129), streams=(StreamSpec(sm_share=96),
                StreamSpec(sm_share=32)), label="x"), verdict="winner", tokens_per_s=1e5,
                baseline_tokens_per_s=8e4, speedup=1.25, speedup_spread=0.02, efficiency=0.7, space="nanoflow",
                params={"num_nano": 2}, study="s", storage="sqlite:///x.db", trial=7)
    return StoredSchedule(**{**base, **kw})


def test_round_trip_and_path(tmp_path):
    store = ScheduleStore(StoreConfig(root=tmp_path))
    path = store.save(record())
    assert path == tmp_path / "schedules" / H100.key / f"{W.key}.json"
    assert store.read(path) == record(created_at=store.read(path).created_at)
    assert not list(path.parent.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_corrupt_and_foreign_files_name_the_file(tmp_path):
    store = ScheduleStore(StoreConfig(root=tmp_path))
    path = store.save(record())
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match=f"schedule record {path} is not valid JSON"):
        store.read(path)
    path.write_text('{"record_schema": 9}')
    with pytest.raises(ValueError, match="record_schema must be 1 to 4, but got 9"):
        store.read(path)


def test_table_lists_records_and_unreadable_files(tmp_path):
    store = ScheduleStore(StoreConfig(root=tmp_path))
    store.save(record())
    bad = tmp_path / "schedules" / H100.key / "broken.json"
    bad.write_text("{")
    table = stored_table(tmp_path)
    assert len(table) == 2
    assert table.loc[table.workload == W.key, "speedup"].item() == 1.25
    assert table.loc[table.workload == "broken", "schedule"].item().startswith("UNREADABLE")


def test_list_prints_whole_trial_numbers_and_a_short_line_for_an_unreadable_record(tmp_path, capsys):
    from dynaflow.tuner.cli import main

    store = ScheduleStore(StoreConfig(root=tmp_path))
    store.save(record())
    (tmp_path / "schedules" / H100.key / "broken.json").write_text('{"record_schema": 4, "hardware": {"kind": 7}}')
    assert main(["list", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines[:-1]) < 200, out  # the table: its error goes below it (was ~260 wide)
    assert "NaN" not in out and "7.0" not in out and " 7 " in lines[[i for i, x in enumerate(lines) if W.key in x][0]]
    assert "UNREADABLE (below)" in out and lines[-1].startswith("unreadable: schedule record ")


# --- show, export, import ------------------------------------------------------------------------------

def test_show_prints_a_record_readably(tmp_path, capsys):
    from dynaflow.runtime import Step
    from dynaflow.tuner.cli import main
    rec = record(schedule=Schedule(split_sizes=(128, 129), streams=(StreamSpec(sm_share=96), StreamSpec(sm_share=32)),
                                   order=(Step(op="qkv", nano=0, stream=0), Step(op="qkv", nano=1, stream=1)), label="x"),
                 verdict="winner", speedup_interval=(1.2, 1.3), confidence=0.998, rounds=5, candidate_speedup=1.25)
    path = ScheduleStore(StoreConfig(root=tmp_path)).save(rec)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    for words in ("verdict    winner: 1.250x over sequential (99.8% interval 1.200-1.300x over 5 paired rounds)",
                  "stream 0: 96 SMs, priority 0",
                  "order      stream 1: qkv/1", "throughput 100,000 tokens/s, sequential 80,000 tokens/s",
                  "origin     nanoflow space, study s trial 7"):
        assert words in out, (words, out)
    # a record holding the sequential schedule shows the best candidate's interval as the candidate's
    seq = dataclasses.replace(rec, schedule=Schedule(), verdict="sequential_best", speedup=1.0, candidate_speedup=0.877,
                              speedup_interval=(0.78, 0.92), trial=None)
    path = ScheduleStore(StoreConfig(root=tmp_path)).save(seq)
    assert main(["show", str(path)]) == 0
    assert ("verdict    sequential best: runs the sequential schedule; the best candidate measured 0.877x (99.8% "
            "interval 0.780-0.920x over 5 paired rounds)") in capsys.readouterr().out


def test_export_then_import_moves_every_record_to_a_machine_of_the_same_type(tmp_path):
    src, dst = ScheduleStore(StoreConfig(root=tmp_path / "a")), ScheduleStore(StoreConfig(root=tmp_path / "b"))
    d64 = Workload(model="llama3-8b", num_decode=64, context_len=2048, dtype="bfloat16", device="cuda")
    src.save(record())
    src.save(record(workload=d64, schedule=Schedule(split_sizes=(32, 32), label="x")))
    bundle = export(src, H100.key)
    saved, kept = import_bundle(dst, json.loads(json.dumps(bundle)), H100, "x.json")
    assert len(saved) == 2 and kept == []
    assert [r.to_dict() for _, r in dst.records()] == [r.to_dict() for _, r in src.records()]


def test_import_refuses_foreign_newer_or_broken_bundles_whole(tmp_path):
    from fakes import A100
    src, dst = ScheduleStore(StoreConfig(root=tmp_path / "a")), ScheduleStore(StoreConfig(root=tmp_path / "b"))
    src.save(record())
    bundle = export(src, H100.key)
    with pytest.raises(ValueError, match=f"tuned on {H100.key}, but this is {A100.key}.*nothing imported"):
        import_bundle(dst, bundle, A100, "x.json")
    with pytest.raises(ValueError, match="export_schema must be 1, but got 2"):
        import_bundle(dst, {**bundle, "export_schema": 2}, H100, "x.json")
    broken = json.loads(json.dumps(bundle))
    broken["records"][0]["tokens_per_s"] = -1
    with pytest.raises(ValueError, match=r"records\[0\] is invalid: record.tokens_per_s must be a finite number > 0"):
        import_bundle(dst, broken, H100, "x.json")
    assert not dst.root.exists()  # nothing written by a refused import


def test_import_keeps_a_conclusive_record_over_an_inconclusive_one(tmp_path):
    src, dst = ScheduleStore(StoreConfig(root=tmp_path / "a")), ScheduleStore(StoreConfig(root=tmp_path / "b"))
    dst.save(record(verdict="winner"))
    src.save(record(verdict="inconclusive", speedup=1.01))
    saved, kept = import_bundle(dst, export(src, H100.key), H100, "x.json")
    assert saved == [] and "kept the stored winner record" in kept[0]
    assert next(dst.records())[1].verdict == "winner"


def test_export_and_import_commands(tmp_path, capsys):
    from dynaflow.runtime import detect
    from dynaflow.tuner.cli import main
    cpu = detect("cpu")
    w = Workload(model="llama-tiny", num_decode=4, context_len=16)
    ScheduleStore(StoreConfig(root=tmp_path / "a")).save(record(hardware=cpu, workload=w,
                                                                schedule=Schedule(split_sizes=(2, 2), label="x")))
    out = tmp_path / "export.json"
    assert main(["export", "--store", str(tmp_path / "a"), "--device", "cpu", "--out", str(out)]) == 0
    assert main(["import", str(out), "--store", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert f"imported 1 record(s) of {cpu.key}" in capsys.readouterr().out
    bundle = json.loads(out.read_text())
    bundle["records"][0]["hardware"]["num_sms"] = cpu.num_sms * 32  # exported on a bigger machine
    out.write_text(json.dumps(bundle))
    assert main(["import", str(out), "--store", str(tmp_path / "c"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "nothing imported" in err
    assert main(["export", "--store", str(tmp_path / "empty"), "--device", "cpu", "--out", str(out)]) == 2
    capsys.readouterr()
    for where, words in ((tmp_path, f"--out names a folder, {tmp_path}; give a file path in it"),
                         (Path("/proc/x.json"), "--out: its folder /proc is under /proc, a kernel interface")):
        assert main(["export", "--store", str(tmp_path / "a"), "--device", "cpu", "--out", str(where)]) == 2
        err = capsys.readouterr().err
        assert error_lines(err) == [err.strip()] and words in err, err


def test_one_replace_rule_for_tuning_and_importing(tmp_path):
    """The store's rule, whoever writes: an inconclusive record never replaces a conclusive one, a
    worse winner of another space never replaces a better one, a re-tune of the same space does."""
    import dataclasses

    from dynaflow.tuner.publish import kept_over

    best = record(verdict="winner", speedup=1.3)
    assert "conclusive" in kept_over(best, record(verdict="inconclusive", speedup=1.01))
    assert "space's stored winner" in kept_over(best, dataclasses.replace(best, space="dbo", speedup=1.1))
    assert kept_over(best, dataclasses.replace(best, speedup=1.1)) is None  # same space: the re-tune wins
    assert kept_over(None, best) is None
    store = ScheduleStore(StoreConfig(root=tmp_path / "a"))
    store.save(best)
    kept, _, why = save_unless_kept(store, dataclasses.replace(best, space="dbo", speedup=1.1))
    assert kept.speedup == 1.3 and "space's stored winner" in why
    other = ScheduleStore(StoreConfig(root=tmp_path / "b"))
    other.save(dataclasses.replace(best, space="dbo", speedup=1.1))
    saved, notes = import_bundle(store, export(other, H100.key), H100, "x.json")
    assert saved == [] and "space's stored winner" in notes[0]  # an import meets the same rule


def test_the_verdict_is_one_typed_field_its_old_twin_only_derived():
    from dynaflow.runtime.store import Verdict

    rec = record(verdict="sequential_best")
    assert rec.verdict is Verdict.SEQUENTIAL_BEST and rec.sequential_best
    d = rec.to_dict()
    assert d["verdict"] == "sequential_best" and d["sequential_best"] is True  # still written, for old readers
    assert StoredSchedule.from_dict(json.loads(json.dumps(d))) == rec
    old = {k: v for k, v in d.items() if k != "verdict"} | {"record_schema": 1, "sequential_best": False}
    assert StoredSchedule.from_dict(old).verdict is Verdict.WINNER  # schema 1 said only the twin
    with pytest.raises(ValueError, match="record.sequential_best is False, but record.verdict is 'sequential_best'"):
        StoredSchedule.from_dict({**d, "sequential_best": False})
    with pytest.raises(ValueError, match="verdict must be one of"):
        record(verdict="maybe")


def test_a_record_whose_splits_do_not_fit_its_workload_is_refused_where_read(tmp_path, capsys):
    """split_sizes [5, 5] in a record of 8 requests: `list` and `show` say why, the start-up map
    refuses it naming the file (as any invalid record), and `export` names the file and how to go on."""
    from dynaflow.runtime import ScheduleMap
    from dynaflow.tuner.cli import main

    w = Workload(model="llama-tiny", num_decode=8, context_len=64, device="cuda", dtype="bfloat16")
    store = ScheduleStore(StoreConfig(root=tmp_path))
    path = store.save(record(workload=w, schedule=Schedule(split_sizes=(4, 4))))
    data = json.loads(path.read_text())
    data["schedule"]["split_sizes"] = [5, 5]
    path.write_text(json.dumps(data))
    why = "record.schedule.split_sizes does not fit record.workload llama-tiny_d8x64_p0_bf16: split_sizes must " \
          "sum to the batch's 8 requests, but [5, 5] sums to 10."
    assert main(["show", str(path)]) == 2
    assert why in capsys.readouterr().err
    assert main(["list", "--store", str(tmp_path)]) == 0
    assert "UNREADABLE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="llama-tiny_d8x64_p0_bf16.json is invalid: record.schedule.split_sizes"):
        ScheduleMap.load(tmp_path, model="llama-tiny", dtype="bfloat16", hardware=H100)  # never answered with
    with pytest.raises(ValueError, match="Nothing was exported: fix that file, or move it out of"):
        export(store, H100.key)
