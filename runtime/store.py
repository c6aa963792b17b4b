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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .files import write_json_atomic
from .hardware import Hardware
from .schedule import Schedule
from .workload import Workload

RECORD_SCHEMA = 2  # 2 added `verdict` and `speedup_interval`; schema-1 records still load
VERDICTS = ("winner", "sequential_best", "inconclusive")


@dataclass(frozen=True, kw_only=True)
class StoredSchedule:
    hardware: Hardware
    workload: Workload
    schedule: Schedule
    sequential_best: bool  # the record holds the sequential schedule (verdict is not "winner")
    tokens_per_s: float
    baseline_tokens_per_s: float
    speedup: float
    speedup_spread: float  # relative noise the speedup had to exceed
    efficiency: float | None
    space: str
    verdict: str = ""  # winner, sequential_best or inconclusive (see tuner/confirm.py); "" from sequential_best
    speedup_interval: tuple[float, float] | None = None  # 95% interval of the best candidate's speedup
    params: dict[str, Any] = field(default_factory=dict)  # the trial's params, for warm starts
    study: str = ""
    storage: str = ""
    trial: int | None = None
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(self, "verdict", "sequential_best" if self.sequential_best else "winner")
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, but got {self.verdict!r}.")
        if self.speedup_interval is not None:
            object.__setattr__(self, "speedup_interval", tuple(self.speedup_interval))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(record_schema=RECORD_SCHEMA, hardware=self.hardware.to_dict(), workload=asdict(self.workload),
                 schedule=self.schedule.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoredSchedule":
        if d.get("record_schema") not in (1, RECORD_SCHEMA):
            raise ValueError(f"record_schema must be 1 or {RECORD_SCHEMA}, but got {d.get('record_schema')!r}; "
                             "a newer dynaflow-tune wrote it, or it is not a schedule record.")
        d = dict(d)
        d.pop("record_schema")
        return cls(**{**d, "hardware": Hardware.from_dict(d["hardware"]), "workload": Workload(**d["workload"]),
                      "schedule": Schedule.from_dict(d["schedule"])})


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreConfig:
    root: Path = Path("results")

    @property
    def peaks_dir(self) -> Path:
        """Where the device peaks are cached, one file per hardware and dtype, for every command."""
        return Path(self.root).absolute() / "peaks"


class ScheduleStore:
    def __init__(self, config: StoreConfig = StoreConfig()) -> None:
        self.root = Path(config.root) / "schedules"

    def path(self, hardware_key: str, workload_key: str) -> Path:
        return self.root / hardware_key / f"{workload_key}.json"

    def save(self, record: StoredSchedule) -> Path:
        path = self.path(record.hardware.key, record.workload.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record.to_dict(), indent=2)
        return path

    def read(self, path: Path) -> StoredSchedule:
        """Parse one record; any defect is a ValueError naming the file."""
        try:
            return StoredSchedule.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
            raise ValueError(f"schedule record {path} is unreadable: {type(e).__name__}: {e}") from None

    def pack_path(self, hardware_key: str) -> Path:
        return self.root / f"{hardware_key}.pack.json"

    def write_pack(self, hardware_key: str, records: list[dict[str, Any]]) -> None:
        """One file holding every validated record of a hardware key, stamped with its files'
        names, sizes and mtimes: start-up reads it instead of each file while none changed."""
        try:
            write_json_atomic(self.pack_path(hardware_key), {"pack_schema": RECORD_SCHEMA, "stamp": self._stamp(hardware_key),
                                                         "records": records}, indent=None)
        except OSError:  # a read-only store still loads, only more slowly
            pass

    def _stamp(self, hardware_key: str) -> str:
        entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(self.root / hardware_key)
                         if e.name.endswith(".json"))
        return hashlib.sha256(repr(entries).encode()).hexdigest()

    def read_pack(self, hardware_key: str) -> list[dict[str, Any]] | None:
        """The packed records if the pack is intact and current, else None."""
        try:
            data = json.loads(self.pack_path(hardware_key).read_text())
            current = data["stamp"] == self._stamp(hardware_key)
            return data["records"] if current and data["pack_schema"] == RECORD_SCHEMA else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def records(self, hardware_key: str | None = None) -> Iterator[tuple[Path, StoredSchedule | ValueError]]:
        """Every record (or the error reading it), optionally for one hardware key."""
        pattern = f"{hardware_key}/*.json" if hardware_key else "*/*.json"  # packs lie beside the folders
        for path in sorted(self.root.glob(pattern)):
            try:
                yield path, self.read(path)
            except ValueError as e:
                yield path, e
