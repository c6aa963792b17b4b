"""The schedule store: results/schedules/<hardware key>/<workload key>.json, JSON only.

A record says which schedule to run for one (hardware, workload) and why: its tokens/s, its
speedup over the sequential baseline with the spread, the roofline efficiency, the study and
trial it came from, and the software it was measured with. When no candidate beat the baseline
by more than the spread, the record holds the sequential schedule and says so.
Writes are atomic (temp file + rename): a crash never leaves half a record.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from . import validate
from .files import write_json_atomic, write_text_atomic
from .hardware import Hardware
from .schedule import Schedule
from .workload import PRESETS, Workload, preset_layout

log = logging.getLogger("dynaflow")

PACK_FORMAT = 2  # 2: a header line with the records' SHA-256, records trusted; raise it when validation tightens
RECORD_SCHEMA = 4  # 2 added `verdict` and `speedup_interval`, 3 `busy`, `contended`, `overlap`, 4 the paired
# rounds' `candidate_speedup`, `confidence`, `rounds`, `busy_rounds`, `no_overlap`; older ones load


class Verdict(str, Enum):
    """What the confirmation concluded (tuner/confirm.py). Members are their strings (JSON)."""

    WINNER = "winner"  # a candidate's interval over paired rounds lies above 1: the record holds it
    SEQUENTIAL_BEST = "sequential_best"  # no candidate can be faster by the minimum effect
    INCONCLUSIVE = "inconclusive"  # too noisy to tell: the sequential schedule is kept

    __str__ = str.__str__


VERDICTS = tuple(v.value for v in Verdict)


@dataclass(frozen=True, kw_only=True)
class StoredSchedule:
    hardware: Hardware
    workload: Workload
    schedule: Schedule
    verdict: Verdict
    tokens_per_s: float
    baseline_tokens_per_s: float
    speedup: float
    speedup_spread: float  # relative noise the speedup had to exceed
    efficiency: float | None
    space: str
    speedup_interval: tuple[float, float] | None = None  # interval of the best candidate's speedup (`confidence`)
    # provenance: where the record came from, written by the tuner and shown by `show`; the runtime
    # validates and carries these, and never interprets them
    params: dict[str, Any] = field(default_factory=dict)  # the trial's params, for warm starts
    study: str = ""
    storage: str = ""
    trial: int | None = None
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    busy: dict[str, Any] = field(default_factory=dict)  # how busy the machine was over the confirmation
    contended: str | None = None  # why the confirmation counts as measured under contention, or None
    overlap: dict[str, Any] | None = None  # a winner's why: what ran at the same time (timeline.overlap)
    candidate_speedup: float | None = None  # the best candidate's speedup (the winner's, or the one not chosen)
    confidence: float | None = None  # the level of speedup_interval (corrected for candidates and looks)
    rounds: int | None = None  # the paired rounds behind the best candidate's interval
    busy_rounds: int = 0  # paired rounds left out of the evidence: the machine was busy
    no_overlap: str | None = None  # a winner that won without overlap: what differs from sequential
    model: dict[str, Any] | None = None  # the performance model when tuned: headroom, predictions, its error

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, but got {validate.short(self.verdict)}.")
        object.__setattr__(self, "verdict", Verdict(self.verdict))
        if self.speedup_interval is not None:
            object.__setattr__(self, "speedup_interval", tuple(self.speedup_interval))

    @property
    def sequential_best(self) -> bool:
        """The record holds the sequential schedule (its verdict is not a winner)."""
        return self.verdict is not Verdict.WINNER

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(record_schema=RECORD_SCHEMA, hardware=self.hardware.to_dict(), workload=asdict(self.workload),
                 schedule=self.schedule.to_dict(), verdict=self.verdict.value,
                 sequential_best=self.sequential_best)  # for readers of schema-1 records
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoredSchedule":
        """A record read from a file: every field's type and range is checked; a defect is one
        ValueError naming the field."""
        d = validate.obj(d, "a record")
        schema = d.get("record_schema")
        if isinstance(schema, bool) or schema not in range(1, RECORD_SCHEMA + 1):
            raise ValueError(f"record_schema must be 1 to {RECORD_SCHEMA}, but got {validate.short(schema)}; "
                             "a newer dynaflow-tune wrote it, or it is not a schedule record.")
        validate.known(d, _RECORD_FIELDS, "the record")
        for key in ("hardware", "workload", "schedule", "tokens_per_s", "baseline_tokens_per_s",
                    "speedup", "speedup_spread", "space"):
            if key not in d:
                raise ValueError(f"the record has no {key!r}.")
        r = "record"
        interval = d.get("speedup_interval")
        if interval is not None:
            if not isinstance(interval, list) or len(interval) != 2:
                raise ValueError(f"record.speedup_interval must be [low, high] or null, but got {validate.short(interval)}.")
            lo, hi = (validate.number({"bound": v}, "bound", "record.speedup_interval") for v in interval)
            if lo > hi:
                raise ValueError(f"record.speedup_interval must have low <= high, but got [{lo}, {hi}].")
            interval = (lo, hi)
        params = validate.obj(d.get("params", {}), "record.params")
        bad = [k for k, v in params.items() if v is not None and not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ValueError(f"record.params values must be numbers, strings or booleans, but {validate.short(bad[0])} "
                             f"is {validate.short(params[bad[0]])}.")
        if "verdict" not in d and "sequential_best" not in d:
            raise ValueError("the record has no 'verdict'.")
        twin = validate.boolean(d, "sequential_best", r) if "sequential_best" in d else None
        verdict = validate.string(d, "verdict", r, default="") or (  # schema 1 said only sequential_best
            Verdict.SEQUENTIAL_BEST if twin else Verdict.WINNER)
        if twin is not None and verdict in VERDICTS and twin != (verdict != Verdict.WINNER):
            raise ValueError(f"record.sequential_best is {twin}, but record.verdict is {verdict!r}: they must agree.")
        try:
            schedule = Schedule.from_dict(d["schedule"])
        except ValueError as e:
            raise ValueError(f"record.schedule: {e}") from None
        workload = Workload.from_dict(d["workload"], "record.workload")
        check_fits(schedule, workload)
        return cls(hardware=Hardware.from_dict(d["hardware"], "record.hardware"),
                   workload=workload, schedule=schedule,
                   tokens_per_s=validate.number(d, "tokens_per_s", r, positive=True),
                   baseline_tokens_per_s=validate.number(d, "baseline_tokens_per_s", r, positive=True),
                   speedup=validate.number(d, "speedup", r, positive=True),
                   speedup_spread=validate.number(d, "speedup_spread", r),
                   efficiency=validate.number(d, "efficiency", r, optional=True),
                   space=validate.string(d, "space", r), verdict=verdict, speedup_interval=interval,
                   params=dict(params), study=validate.string(d, "study", r, default=""),
                   storage=validate.string(d, "storage", r, default=""),
                   trial=validate.integer(d, "trial", r, lo=0, optional=True),
                   created_at=validate.string(d, "created_at", r, default=""), busy=_busy(d.get("busy", {})),
                   contended=validate.string(d, "contended", r, optional=True),
                   overlap=_overlap(d.get("overlap")),
                   candidate_speedup=validate.number(d, "candidate_speedup", r, optional=True),
                   confidence=validate.number(d, "confidence", r, optional=True),
                   rounds=validate.integer(d, "rounds", r, lo=0, optional=True),
                   busy_rounds=validate.integer(d, "busy_rounds", r, lo=0, optional=True) or 0,
                   no_overlap=validate.string(d, "no_overlap", r, optional=True),
                   model=dict(validate.obj(d["model"], "record.model")) if d.get("model") is not None else None)


def _busy(value: Any) -> dict[str, Any]:
    busy = validate.obj(value, "record.busy")
    for key in busy:
        validate.number(busy, key, "record.busy", optional=True)
    return dict(busy)


def _overlap(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    o, name = validate.obj(value, "record.overlap"), "record.overlap"
    validate.known(o, {"makespan_ms", "overlapped_ms", "by_resources", "top"}, name)
    for key in ("makespan_ms", "overlapped_ms"):
        validate.number(o, key, name)
    pairs = validate.obj(o.get("by_resources", {}), f"{name}.by_resources")
    for key in pairs:
        validate.number(pairs, key, f"{name}.by_resources")
    top = o.get("top", [])
    if not isinstance(top, list):
        raise ValueError(f"{name}.top must be a list, but got {validate.short(top)}.")
    for i, item in enumerate(top):
        item = validate.obj(item, f"{name}.top[{i}]")
        ops = item.get("ops")
        if not (isinstance(ops, list) and len(ops) == 2 and all(isinstance(x, str) for x in ops)):
            raise ValueError(f"{name}.top[{i}].ops must be two op/nano-batch names, but got {validate.short(ops)}.")
        validate.number(item, "ms", f"{name}.top[{i}]")
    return dict(o)


def check_hardware(record: "StoredSchedule | Hardware", live: Hardware, source: str, *,
                   fix: str = "re-tune on this hardware") -> None:
    """The one hardware rule for records (or a record's hardware): refuse one tuned on other
    hardware (saying `fix`); warn when the software has changed since."""
    tuned_on = record if isinstance(record, Hardware) else record.hardware
    wrong = live.mismatch(tuned_on)
    if wrong:
        raise ValueError(f"{source} was tuned on {tuned_on.key}, but this is {live.key} "
                         f"({'; '.join(wrong)}); {fix}.")
    drift = live.drift(tuned_on)
    if drift:
        log.warning("%s was measured with other software (%s); its speedup may have changed: re-tune to be sure",
                    source, ", ".join(drift))


def hardware_folder(store: "ScheduleStore", live: Hardware) -> str:
    """The folder of the live hardware's records: its key, or, in a store written before memory
    left the key, `<key>-<N>g` (any N: the records' own memory is checked, within tolerance)."""
    if (store.root / live.key).is_dir() or not store.root.is_dir():
        return live.key
    legacy = sorted(p.name for p in store.root.glob(f"{live.key}-*g") if p.is_dir())
    return min(legacy, key=lambda name: name != live.legacy_key) if legacy else live.key


def read_record(path: Path) -> StoredSchedule:
    """One record file, validated whole; any defect is one ValueError naming the file."""
    data = validate.read_json(path, "schedule record")
    try:
        return StoredSchedule.from_dict(data)
    except ValueError as e:
        raise ValueError(f"schedule record {path} is invalid: {e}") from None


_RECORD_FIELDS = frozenset(f.name for f in fields(StoredSchedule)) | {"record_schema", "sequential_best"}


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreConfig:
    root: Path = Path("results")

    @property
    def peaks_dir(self) -> Path:
        """Where the device peaks are cached, one file per hardware and dtype, for every command."""
        return Path(self.root).absolute() / "peaks"

    @property
    def profiles_dir(self) -> Path:
        """Where the performance model's profiles are cached: <hardware>/<workload>.json."""
        return Path(self.root).absolute() / "profiles"


def check_fits(schedule: Schedule, workload: Workload) -> None:
    """A record's splits must cut its own workload's batch (the built-in and `hf:` models, whose
    batch the workload alone says: decode requests of one token, prefill requests of a chunk); a
    record that breaks the rule is refused where it is read, naming the field."""
    if not schedule.split_sizes or not (workload.model in PRESETS or workload.model.startswith("hf:")):
        return
    layout = preset_layout(workload.num_decode, workload.num_prefill, workload.chunk)
    try:
        layout.request_ranges(schedule.split_unit, schedule.split_sizes)
    except ValueError as e:
        raise ValueError(f"record.schedule.split_sizes does not fit record.workload {workload.key}: {e}") from None


class ScheduleStore:
    """Records under <root>/schedules/<hardware key>/<workload key>.json. Nothing is read or
    written through a path that resolves outside <root> (a symbolic link to elsewhere): such a
    path is a ValueError naming it."""

    def __init__(self, config: StoreConfig = StoreConfig()) -> None:
        self.base = Path(config.root)
        self.root = self.base / "schedules"

    def inside(self, path: Path) -> Path:
        """`path`, checked to resolve inside the store's root."""
        real_base, real = self.base.resolve(), Path(path).resolve()
        if not real.is_relative_to(real_base):
            raise ValueError(f"{path} resolves to {real}, outside the store {real_base} (a symbolic link?); "
                             "the store reads and writes only inside its root.")
        return Path(path)

    def path(self, hardware_key: str, workload_key: str) -> Path:
        return self.inside(self.root / hardware_key / f"{workload_key}.json")

    def save(self, record: StoredSchedule) -> Path:
        path = self.path(record.hardware.key, record.workload.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.inside(path), record.to_dict(), indent=2)
        return path

    def read(self, path: Path) -> StoredSchedule:
        """Parse and validate one record of this store; any defect is one ValueError naming the file."""
        return read_record(self.inside(path))

    def pack_path(self, hardware_key: str) -> Path:
        return self.root / f"{hardware_key}.pack.json"

    def write_pack(self, hardware_key: str, records: list[dict[str, Any]]) -> None:
        """One file holding every validated record of a hardware key: a header line (the pack's
        format, its folder's stamp: the record files' names, sizes and mtimes; the SHA-256 of the
        records' text), then the records. Start-up reads it instead of each file while none
        changed, and trusts its records without validating each again (they were, whole, before
        it was written); each is parsed at its first use."""
        body = json.dumps(records, separators=(",", ":"))
        header = {"pack_schema": RECORD_SCHEMA, "pack_format": PACK_FORMAT, "stamp": self._stamp(hardware_key),
                  "sha256": hashlib.sha256(body.encode()).hexdigest()}
        try:
            write_text_atomic(self.inside(self.pack_path(hardware_key)), f"{json.dumps(header)}\n{body}\n")
        except (OSError, ValueError):  # a read-only store still loads, only more slowly
            pass

    def _stamp(self, hardware_key: str) -> str:
        entries = sorted((e.name, st.st_mtime_ns, st.st_size) for e in os.scandir(self.root / hardware_key)
                         if e.name.endswith(".json") for st in (e.stat(),))
        return hashlib.sha256(repr(entries).encode()).hexdigest()

    def read_pack(self, hardware_key: str) -> list[dict] | None:
        """The packed records (JSON objects, validated when the pack was written) if the pack is
        intact and current; else None (start-up then reads the record files, and says why when the
        pack is damaged: a header that is not this format's, records whose text is not the text
        the header's digest was taken of)."""
        path = self.pack_path(hardware_key)
        if not path.exists():
            return None
        try:
            self.inside(path)
            try:
                text = path.read_bytes()
            except OSError as e:
                raise ValueError(f"it is unreadable: {e.strerror or e}") from None
            first, _, body = text.partition(b"\n")
            try:
                header = json.loads(first)
            except RecursionError:
                raise ValueError("it nests JSON deeper than any record or schedule does") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"its first line is not a JSON header ({e})") from None
            if not isinstance(header, dict) or header.get("pack_format") != PACK_FORMAT:
                return None  # written by another version of the store: the files are read, and it is rewritten
            if header.get("stamp") != self._stamp(hardware_key) or header.get("pack_schema") != RECORD_SCHEMA:
                return None  # stale: a record file changed since it was written
            body = body.rstrip(b"\n")
            if hashlib.sha256(body).hexdigest() != header.get("sha256"):
                raise ValueError("its records are not the ones it was written with (their SHA-256 differs)")
            records = json.loads(body)
            if not isinstance(records, list) or not all(map(_packable, records)):
                raise ValueError("its records are not a list of records with a hardware and a workload")
            return records
        except (ValueError, RecursionError) as e:
            log.warning("ignoring the pack %s (%s); reading the record files", path, e)
            return None

    def records(self, hardware_key: str | None = None) -> Iterator[tuple[Path, StoredSchedule | ValueError]]:
        """Every record (or the error reading it), optionally for one hardware key."""
        pattern = f"{hardware_key}/*.json" if hardware_key else "*/*.json"  # packs lie beside the folders
        for path in sorted(self.root.glob(pattern)):
            try:
                yield path, self.read(path)  # a path resolving outside the store is an error, not read
            except ValueError as e:
                yield path, e


def _packable(r: Any) -> bool:
    """What start-up reads of a packed record before its first use: its hardware and its workload's
    bucket and identity (the rest is validated when the record is parsed)."""
    w = r.get("workload") if isinstance(r, dict) else None
    return isinstance(r.get("hardware") if isinstance(r, dict) else None, dict) and isinstance(w, dict) and all(
        type(w.get(k)) is int and w[k] >= 0 for k in ("num_decode", "prefill_tokens", "context_len")) and all(
        isinstance(w.get(k), str) for k in ("model", "dtype"))


def read_records(store: "ScheduleStore", live: Hardware, on_error: str) -> list[tuple[dict, StoredSchedule | None]]:
    """The validated records of the live hardware: from the pack when it is current (raw, each
    parsed at its first use: `None` beside it), else from every file (each fully validated, raw and
    parsed, then the pack is rewritten for the next start-up). Every record's hardware is checked
    against the live device either way (a pack's, once per distinct hardware it holds)."""
    key = hardware_folder(store, live)
    if not (store.root / key).is_dir():
        return []
    packed = store.read_pack(key)
    if packed is not None:
        seen: list = []
        for r in packed:
            if r["hardware"] not in seen:  # a few distinct ones at most (the software that tuned each)
                seen.append(r["hardware"])
                check_hardware(Hardware.from_dict(r["hardware"], "record.hardware"), live, str(store.pack_path(key)))
        return [(r, None) for r in packed]
    good, broken = [], False
    for path, rec in store.records(key):
        if isinstance(rec, ValueError):
            if on_error == "raise":
                raise rec
            log.warning("%s; skipped", rec)
            broken = True
            continue
        check_hardware(rec, live, str(path))
        good.append((rec.to_dict(), rec))
    if not broken:  # a pack must never hide a broken file from a later, stricter load
        store.write_pack(key, [r for r, _ in good])
    return good
