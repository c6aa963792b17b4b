"""What the tuner writes into the schedule store the runtime reads (runtime/store.py): the one
replace rule a new record meets (`kept_over`, applied by `save_unless_kept`), and bundles of one
hardware's records carried between machines (`export`, `import_bundle`: `dynaflow-tune export`
and `import`). A server never replaces records, so none of this is in runtime/."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dynaflow.runtime import Hardware, validate
from dynaflow.runtime.store import ScheduleStore, StoredSchedule, check_hardware

EXPORT_SCHEMA = 1


def kept_over(old: StoredSchedule | None, new: StoredSchedule) -> str | None:
    """The one replace rule: why the stored record `old` stays instead of `new`, or None. An
    inconclusive verdict never replaces a conclusive record; a winner of one space never gives way
    to a worse one of another; a conclusive re-tune of the same space always replaces."""
    if old is None:
        return None
    if new.verdict == "inconclusive" and old.verdict != "inconclusive":
        return f"kept the stored {old.verdict.replace('_', ' ')} record: it is conclusive, the new one is not"
    if new.contended and old.verdict != "inconclusive" and not old.contended:
        return (f"kept the stored {old.verdict.replace('_', ' ')} record measured quiet: the new one was measured "
                "under contention (--accept-contention)")
    if old.space != new.space and old.speedup > new.speedup:
        return f"kept the {old.space} space's stored winner: it is better"
    return None


def export(store: ScheduleStore, hardware_key: str) -> dict[str, Any]:
    """Every valid record of one hardware key, as one JSON-able bundle; a broken file is an error."""
    records = []
    for path, rec in store.records(hardware_key):
        if isinstance(rec, ValueError):
            raise ValueError(f"{rec} Nothing was exported: fix that file, or move it out of {path.parent}, and "
                             "export again (`dynaflow-tune list` shows every unreadable record).") from None
        records.append(rec.to_dict())
    if not records:
        raise ValueError(f"{store.root / hardware_key} holds no records to export.")
    return {"export_schema": EXPORT_SCHEMA, "hardware": hardware_key, "records": records}

def import_bundle(store: ScheduleStore, bundle: Any, live: Hardware, source: str) -> tuple[list[Path], list[str]]:
    """Save a bundle's records here after validating all of them: its schema, every record whole,
    and every record's hardware against this machine's (a foreign bundle is refused whole).
    A stored conclusive record is not replaced by an inconclusive one. (saved paths, kept notes)"""
    bundle = validate.obj(bundle, f"export file {source}")
    schema = bundle.get("export_schema")
    if isinstance(schema, bool) or schema != EXPORT_SCHEMA:
        raise ValueError(f"export file {source}: export_schema must be {EXPORT_SCHEMA}, but got "
                         f"{validate.short(schema)}; a newer dynaflow-tune wrote it, or it is not an export.")
    records = bundle.get("records")
    if not isinstance(records, list) or not records:
        raise ValueError(f"export file {source}: records must be a non-empty list, but got {validate.short(records)}.")
    parsed = []
    for i, d in enumerate(records):
        try:
            rec = StoredSchedule.from_dict(d)
        except ValueError as e:
            raise ValueError(f"export file {source}: records[{i}] is invalid: {e}") from None
        if rec.hardware.key != bundle.get("hardware"):
            raise ValueError(f"export file {source}: records[{i}] was tuned on {rec.hardware.key}, but the file "
                             f"says {validate.short(bundle.get('hardware'))}; nothing imported.")
        check_hardware(rec, live, f"export file {source}", fix="nothing imported: import it on that hardware")
        parsed.append(rec)
    saved, kept = [], []
    for rec in parsed:
        _, path, why = save_unless_kept(store, rec)
        if why:
            kept.append(f"{rec.workload.key}: {why}")
        else:
            saved.append(path)
    return saved, kept

def stored(store: ScheduleStore, record: StoredSchedule) -> StoredSchedule | None:
    """The record stored under `record`'s keys, if one is there and readable."""
    path = store.path(record.hardware.key, record.workload.key)
    if not path.exists():
        return None
    try:
        return store.read(path)
    except ValueError:
        return None  # an unreadable record is replaced

def save_unless_kept(store: ScheduleStore, record: StoredSchedule) -> tuple[StoredSchedule, Path, str | None]:
    """Save `record` unless the stored one stays by the replace rule: (the record in force,
    its path, why the stored one was kept or None)."""
    old = stored(store, record)
    why = kept_over(old, record)
    if why:
        return old, store.path(old.hardware.key, old.workload.key), why
    return record, store.save(record), None
