"""Load tuned schedules at server start-up and pick one per live batch.

    smap = ScheduleMap.load("results", model="llama3-8b", dtype="bfloat16")   # once, at start-up
    schedule = smap.pick(batch_layout)                                        # every step

The fallback chain, logged once per rule (runtime/shapes.py defines "nearest"): the exact
bucket (same decode requests and prefill tokens; "exact, rescaled" when its stored splits had to
be refitted to the live rows); else the nearest stored bucket holding the same kinds of request
(decode-only, prefill-only or mixed) within 2x per dimension, its splits rescaled to the live
batch; else the sequential schedule.
A record from another architecture, SM count or memory size is refused; a software drift warns.
Loading parses JSON only: nothing in a file is ever executed.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .batch import BatchLayout
from .hardware import Hardware, detect, live_device
from .schedule import Schedule
from .store import ScheduleStore, StoreConfig, StoredSchedule, check_hardware, hardware_folder, read_record, read_records
from .shapes import NEAREST_RATIO, Bucket, BucketIndex, ShapeLog, candidates, context_bucket
from .workload import Workload, model_name, preset_layout

log = logging.getLogger("dynaflow")
Policy = Callable[[BatchLayout], Schedule]


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

    Records read from their files are validated whole at load; records read from a current pack
    (validated whole when it was written, its digest checked) are parsed the first time a lookup
    chooses them. The answer for each live shape (its rule and its bucket) is computed once
    and cached; every lookup then counts its rule (`rule_counts`) and its bucket (`shapes`, a
    ShapeLog a server can save and `dynaflow-tune tune --shapes` can tune), at constant cost."""

    def __init__(self, records: list[dict], *, parsed: list[StoredSchedule | None] | None = None,
                 source: str = "schedules",
                 model: str | None = None, max_ratio: float = NEAREST_RATIO) -> None:
        order = sorted(range(len(records)),
                       key=lambda i: -(records[i]["workload"]["num_decode"] + records[i]["workload"]["prefill_tokens"]))
        self.raw = [records[i] for i in order]
        self.buckets = [Bucket(num_decode=r["workload"]["num_decode"], prefill_tokens=r["workload"]["prefill_tokens"],
                               context_len=r["workload"]["context_len"]) for r in self.raw]
        self.source, self.max_ratio = source, max_ratio
        self._index: BucketIndex | None = None  # built at the first new shape: start-up reads only
        self.shapes = ShapeLog(model=model)
        self.rule_counts: Counter = Counter()
        self.unsplit = 0  # lookups answered by a split schedule that the caller ran unsplit (its cache cannot split)
        self._parsed: dict[int, StoredSchedule] = {j: parsed[i] for j, i in enumerate(order)
                                                   if parsed and parsed[i] is not None}
        self._cache: dict[tuple, tuple[Schedule, str, Bucket]] = {}
        self._said: set[str] = set()

    @property
    def records(self) -> list[StoredSchedule]:
        return [self._record(i) for i in range(len(self.raw))]

    @classmethod
    def load(cls, store: str | Path, *, model: str, dtype: str = "bfloat16", hardware: Hardware | None = None,
             device: str | None = None, on_error: str = "raise", max_ratio: float = NEAREST_RATIO, tp: int = 1,
             sequence_parallel: bool = False) -> "ScheduleMap":
        """Every record for this hardware, model, dtype and tensor parallelism (a TP rank's server
        gives its `tp`: a shard's ops are not the whole layer's) under `store`. The hardware is the live
        device's (`device`: default cuda where torch sees one, else cpu). on_error: "raise" (a
        corrupt, truncated or newer-schema file is an error naming it) or "warn" (skip it). A map
        that finds nothing says why in one WARNING naming the path, and answers sequential."""
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', but got {on_error!r}.")
        live = hardware or detect(live_device(device))
        store_obj = ScheduleStore(StoreConfig(root=Path(store)))
        pairs = read_records(store_obj, live, on_error)
        raw = [r for r, _ in pairs]
        wanted = model_name(model)
        mine = [(r, rec) for r, rec in pairs if model_name(r["workload"]["model"]) == wanted
                and r["workload"]["dtype"] == dtype and r["workload"].get("tp", 1) == tp
                and r["workload"].get("sequence_parallel", False) == sequence_parallel]
        if mine:
            log.info("loaded %d schedule(s) for %s %s on %s from %s", len(mine), model, dtype, live.key, store)
        else:
            log.warning("no stored schedules for %s %s on %s: %s; every batch runs sequential", model, dtype, live.key,
                        _why_empty(store_obj, live, raw, model, dtype,
                                   _parallelism({"tp": tp, "sequence_parallel": sequence_parallel})))
        return cls([r for r, _ in mine], parsed=[rec for _, rec in mine], source=str(store), model=model,
                   max_ratio=max_ratio)

    def pick(self, layout: BatchLayout, context_len: int = 0) -> Schedule:
        """The schedule for this live batch."""
        key = (layout.request_tokens, layout.request_kinds, context_bucket(context_len))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._choose(layout, Bucket.of(layout, context_len))
        self.rule_counts[hit[1]] += 1
        self.shapes.calls[hit[2]] += 1
        return hit[0]

    def pick_counts(self, num_decode: int, num_prefill: int = 0, chunk: int = 0, context_len: int = 0) -> Schedule:
        """The fast path for built-in layers' batches: decode requests, then prefill requests of `chunk` tokens."""
        key = (num_decode, num_prefill, chunk, context_bucket(context_len))
        hit = self._cache.get(key)
        if hit is None:
            live = Bucket(num_decode=num_decode, prefill_tokens=num_prefill * chunk, num_prefill=num_prefill,
                          context_len=key[3])  # what Bucket.of the preset layout says, without walking it
            hit = self._cache[key] = self._choose(preset_layout(num_decode, num_prefill, chunk), live)
        self.rule_counts[hit[1]] += 1
        self.shapes.calls[hit[2]] += 1
        return hit[0]

    __call__ = pick

    def answers(self) -> dict[Bucket, str]:
        """Which rule answered each live bucket seen so far."""
        return {bucket: rule for _, rule, bucket in self._cache.values()}

    def tuned_share(self) -> float:
        """The share of lookups answered by a stored bucket (exact or nearest) and run as answered:
        not sequential, and not run unsplit by a caller that could not split (`ran_unsplit`)."""
        total = sum(self.rule_counts.values())
        return (total - self.rule_counts["sequential"] - self.unsplit) / total if total else 0.0

    def ran_unsplit(self) -> None:
        """The caller got a split schedule for its last lookup and ran it unsplit (an HF decoder
        layer with a DynamicCache): that lookup does not count as tuned."""
        self.unsplit += 1

    def _record(self, i: int) -> StoredSchedule:
        if i not in self._parsed:
            self._parsed[i] = StoredSchedule.from_dict(self.raw[i])
        return self._parsed[i]

    def _choose(self, layout: BatchLayout, live: Bucket) -> tuple[Schedule, str, Bucket]:
        if self._index is None:
            self._index = BucketIndex(self.buckets, self.max_ratio)
        head = self._index.first(live)  # the closest buckets, without scoring every one

        def rest():  # every candidate, scored: only when none of the closest fits the live batch
            tried = {i for i, _ in head}
            yield from (c for c in candidates(self.buckets, live, self.max_ratio) if c[0] not in tried)

        for i, rule in itertools.chain(head, rest()):
            try:
                stored = self._record(i).schedule
            except ValueError as e:  # a packed record first parsed now (a pack written by hand): never a crash
                self._say(f"invalid {i}", lambda: f"a record in {self.source} is invalid ({e}); skipped", logging.WARNING)
                continue
            fitted = fit_to_batch(stored, layout)
            if fitted is None:
                continue
            if rule == "exact" and fitted is not stored:
                rule = "exact, rescaled"  # the bucket matches, its stored splits did not fit the live rows
            self._say(rule, lambda: f"{rule}: {self._record(i).workload.key} for live {live}")
            return fitted, rule, live
        self._say("sequential", lambda: f"sequential: no stored bucket within {self.max_ratio:g}x of live {live} "
                                        f"with the same kinds of request in {self.source}")
        return Schedule(label="sequential (fallback)"), "sequential", live

    def _say(self, rule: str, message: Callable[[], str], level: int = logging.INFO) -> None:
        if rule not in self._said:  # once per rule, not once per step (the message made only then)
            self._said.add(rule)
            log.log(level, "schedule lookup: %s", message())


def _parallelism(w: dict) -> str:
    """" at tp=N" (" with sequence parallelism") for a tensor-parallel workload's dict, else ""."""
    tp = w.get("tp", 1)
    return f" at tp={tp}" + (" with sequence parallelism" if w.get("sequence_parallel") else "") if tp > 1 else ""


def _why_empty(store: ScheduleStore, live: Hardware, raw: list[dict], model: str, dtype: str,
               parallelism: str = "") -> str:
    if not store.base.exists():
        return f"the store {store.base} does not exist"
    if not (store.root / hardware_folder(store, live)).is_dir():
        others = sorted(p.name for p in store.root.glob("*") if p.is_dir()) if store.root.is_dir() else []
        return (f"{store.root} holds no records for this hardware"
                + (f" (only for {', '.join(others)})" if others else ""))
    found = sorted({f"{r['workload']['model']} {r['workload']['dtype']}{_parallelism(r['workload'])}" for r in raw})
    return (f"{store.root / hardware_folder(store, live)} holds no records for {model} {dtype}{parallelism}"
            + (f" (only for {', '.join(found)})" if found else ""))


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
    smap = ScheduleMap.load(path, model=workload.model, dtype=workload.dtype, hardware=live, on_error=on_error,
                            tp=workload.tp, sequence_parallel=workload.sequence_parallel)
    return smap.pick(workload.build_layout(), workload.context_len)
