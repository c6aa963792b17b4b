"""The store writes atomically, reads back exactly, and names the file on any defect."""
import pytest

from dynaflow.runtime import Schedule, StreamSpec, Workload
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.tuner.report import stored_table
from fakes import H100

W = Workload(model="llama3-8b", num_decode=256, context_len=2048, prefill_tokens=512, dtype="bfloat16",
             device="cuda")


def record(**kw) -> StoredSchedule:
    base = dict(hardware=H100, workload=W, schedule=Schedule(split_sizes=(128, 129), streams=(StreamSpec(sm_share=96),
                StreamSpec(sm_share=32)), label="x"), sequential_best=False, tokens_per_s=1e5,
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
    with pytest.raises(ValueError, match="record_schema must be 1 or 2, but got 9"):
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
