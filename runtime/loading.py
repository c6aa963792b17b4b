"""Load tuned schedules at server start-up and pick one per live batch.

    smap = ScheduleMap.load("results", model="llama3-8b", dtype="bfloat16")   # once, at start-up
    schedule = smap.pick(batch_layout)                                        # every step

The fallback chain, logged once per rule: the exact bucket; else the nearest stored bucket at
or below the live batch (its splits rescaled to the live batch); else the sequential schedule.
A record from another architecture, SM count or memory size is refused; a software drift warns.
Loading parses JSON only: nothing in a file is ever executed.
"""
from __future__ import annotations

import bisect
import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .batch import BatchLayout
from .hardware import Hardware, detect
from .schedule import Schedule
from .store import ScheduleStore, StoreConfig, StoredSchedule, read_record
from .workload import Workload, preset_layout

log = logging.getLogger("dynaflow")
Policy = Callable[[BatchLayout], Schedule]


@dataclass(frozen=True, kw_only=True, slots=True)
class Bucket:
    """The batch shape a record was tuned for, and the shape of a live batch."""

    num_decode: int
    prefill_tokens: int
    context_len: int

    @classmethod
    def of(cls, layout: BatchLayout, context_len: int = 0) -> "Bucket":
        kinds, tokens = layout.request_kinds, layout.request_tokens
        decode = sum(1 for k in kinds if k == "decode")
        return cls(num_decode=decode, prefill_tokens=sum(t for k, t in zip(kinds, tokens) if k != "decode"),
                   context_len=context_len)

    def fits_under(self, live: "Bucket") -> bool:
        return self.num_decode <= live.num_decode and self.prefill_tokens <= live.prefill_tokens


def check_hardware(record: StoredSchedule, live: Hardware, source: str) -> None:
    """Refuse a schedule tuned on other hardware; warn when the software has changed since."""
    wrong = live.mismatch(record.hardware)
    if wrong:
        raise ValueError(f"{source} was tuned on {record.hardware.key}, but this is {live.key} "
                         f"({'; '.join(wrong)}); re-tune on this hardware.")
    drift = live.drift(record.hardware)
    if drift:
        log.warning("%s was measured with other software (%s); its speedup may have changed: re-tune to be sure",
                    source, ", ".join(drift))


def fit_to_batch(schedule: Schedule, layout: BatchLayout) -> Schedule | None:
    """The schedule with its splits rescaled to `layout` (same proportions of tokens, cut on
    request boundaries), or None when the live batch cannot hold that many nano-batches."""
    if not schedule.split_sizes:
        return schedule
    total = layout.num_tokens if schedule.split_unit == "tokens" else layout.num_requests
    if sum(schedule.split_sizes) == total:
        try:
            layout.request_ranges(schedule.split_unit, schedule.split_sizes)
            return schedule
        except ValueError:
            pass
    fractions = [c / sum(schedule.split_sizes) for c in itertools.accumulate(schedule.split_sizes)][:-1]
    if layout.num_requests < 2:
        return None
    cuts = [0, *layout.nearest_cuts(fractions, range(1, layout.num_requests), unit=schedule.split_unit)]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        return None
    cuts.append(layout.num_requests)
    sizes = tuple(b - a for a, b in zip(cuts, cuts[1:]))
    return replace(schedule, split_unit="requests", split_sizes=sizes)


class ScheduleMap:
    """The stored schedules of one (hardware, model, dtype), looked up per live batch.

    Records are parsed and validated at load; a record becomes a Schedule the first time a
    lookup chooses it. Lookups are cached per (batch shape, nearest stored context)."""

    def __init__(self, records: list[dict], *, source: str = "schedules") -> None:
        self.raw = sorted(records, key=lambda r: -(r["workload"]["num_decode"] + r["workload"]["prefill_tokens"]))
        self.buckets = [Bucket(num_decode=r["workload"]["num_decode"], prefill_tokens=r["workload"]["prefill_tokens"],
                               context_len=r["workload"]["context_len"]) for r in self.raw]
        self.contexts = sorted({b.context_len for b in self.buckets})
        self.source = source
        self._parsed: dict[int, StoredSchedule] = {}
        self._cache: dict[tuple, Schedule] = {}
        self._said: set[str] = set()

    @property
    def records(self) -> list[StoredSchedule]:
        return [self._record(i) for i in range(len(self.raw))]

    @classmethod
    def load(cls, store: str | Path, *, model: str, dtype: str = "bfloat16", hardware: Hardware | None = None,
             device: str = "cuda", on_error: str = "raise") -> "ScheduleMap":
        """Every record for this hardware, model and dtype under `store`. on_error: "raise" (a
        corrupt, truncated or newer-schema file is an error naming it) or "warn" (skip it)."""
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', but got {on_error!r}.")
        live = hardware or detect(device)
        raw = read_records(ScheduleStore(StoreConfig(root=Path(store))), live, on_error)
        mine = [r for r in raw if r["workload"]["model"] == model and r["workload"]["dtype"] == dtype]
        log.info("loaded %d schedule(s) for %s %s on %s from %s", len(mine), model, dtype, live.key, store)
        return cls(mine, source=str(store))

    def pick(self, layout: BatchLayout, context_len: int = 0) -> Schedule:
        """The schedule for this live batch."""
        key = (layout.request_tokens, layout.request_kinds, self._nearest_context(context_len))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._choose(layout, Bucket.of(layout, context_len))
        return hit

    def pick_counts(self, num_decode: int, num_prefill: int = 0, chunk: int = 0, context_len: int = 0) -> Schedule:
        """The fast path for built-in layers' batches: decode requests, then prefill requests of `chunk` tokens."""
        key = (num_decode, num_prefill, chunk, self._nearest_context(context_len))
        hit = self._cache.get(key)
        if hit is None:
            layout = preset_layout(num_decode, num_prefill, chunk)
            hit = self._cache[key] = self._choose(layout, Bucket.of(layout, context_len))
        return hit

    __call__ = pick

    def _nearest_context(self, context_len: int) -> int:
        if not self.contexts:
            return 0
        i = bisect.bisect_left(self.contexts, context_len)
        near = self.contexts[max(0, i - 1): i + 1]
        return min(near, key=lambda c: (abs(c - context_len), c))

    def _record(self, i: int) -> StoredSchedule:
        if i not in self._parsed:
            self._parsed[i] = StoredSchedule.from_dict(self.raw[i])
        return self._parsed[i]

    def _choose(self, layout: BatchLayout, live: Bucket) -> Schedule:
        exact = [i for i, b in enumerate(self.buckets)
                 if (b.num_decode, b.prefill_tokens) == (live.num_decode, live.prefill_tokens)]
        under = (i for i, b in enumerate(self.buckets) if b.fits_under(live))  # largest first
        for rule, candidates in (("exact bucket", exact), ("nearest bucket below", under)):
            for i in self._closest_context_first(candidates, live):
                fitted = fit_to_batch(self._record(i).schedule, layout)
                if fitted is not None:
                    self._say(rule, f"{rule}: {self._record(i).workload.key} for live {live}")
                    return fitted
        self._say("sequential", f"sequential: no stored bucket at or below live {live} in {self.source}")
        return Schedule(label="sequential (fallback)")

    def _closest_context_first(self, candidates, live: Bucket):
        """Within the largest bucket size, the closest context first; then the next size."""
        group: list[int] = []
        for i in candidates:
            if group and self._size(i) != self._size(group[0]):
                yield from sorted(group, key=lambda j: abs(self.buckets[j].context_len - live.context_len))
                group = []
            group.append(i)
        yield from sorted(group, key=lambda j: abs(self.buckets[j].context_len - live.context_len))

    def _size(self, i: int) -> int:
        return self.buckets[i].num_decode + self.buckets[i].prefill_tokens

    def _say(self, rule: str, message: str) -> None:
        if rule not in self._said:  # once per rule, not once per step
            self._said.add(rule)
            log.info("schedule lookup: %s", message)


def read_records(store: ScheduleStore, live: Hardware, on_error: str) -> list[dict]:
    """The validated records of the live hardware: from the pack when it is current, else from
    every file (each fully validated, then the pack is rewritten for the next start-up)."""
    folder = store.root / live.key
    if not folder.is_dir():
        return []
    packed = store.read_pack(live.key)
    if packed is not None:
        for rec in packed:
            check_hardware(rec, live, str(store.pack_path(live.key)))
        return [rec.to_dict() for rec in packed]
    good, broken = [], False
    for path, rec in store.records(live.key):
        if isinstance(rec, ValueError):
            if on_error == "raise":
                raise rec
            log.warning("%s; skipped", rec)
            broken = True
            continue
        check_hardware(rec, live, str(path))
        good.append(rec.to_dict())
    if not broken:  # a pack must never hide a broken file from a later, stricter load
        store.write_pack(live.key, good)
    return good


def load_schedule(store: str | Path, workload: Workload, *, hardware: Hardware | None = None,
                  on_error: str = "raise") -> Schedule:
    """The schedule for one workload on this hardware, through the fallback chain. `store` is a
    store root, or one record file (then it must match this hardware)."""
    path = Path(store)
    live = hardware or detect(workload.device)
    if path.is_file():
        rec = read_record(path)
        check_hardware(rec, live, str(path))
        return rec.schedule
    smap = ScheduleMap.load(path, model=workload.model, dtype=workload.dtype, hardware=live, on_error=on_error)
    return smap.pick(workload.build_layout(), workload.context_len)
