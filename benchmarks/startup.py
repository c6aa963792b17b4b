"""Start-up: load a store of 1,000 schedules and answer 10,000 lookups of live batch shapes.

    python benchmarks/startup.py

Targets: under 25 ms to load from the pack and under 50 us for a lookup of a shape seen for the
first time (a new shape: the buckets searched, the stored splits fitted to the live batch), under
10 us for a shape seen before. Each time is printed beside the floor measured in the same run:
`json.loads` of the same pack for the load, and a dict lookup for a repeated shape.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dynaflow.runtime import Schedule, StreamSpec, Workload  # noqa: E402
from dynaflow.runtime.loading import ScheduleMap  # noqa: E402
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule  # noqa: E402
from dynaflow.runtime.workload import preset_layout  # noqa: E402
from fakes import H100  # noqa: E402


def fill(root: Path, n: int) -> None:
    store = ScheduleStore(StoreConfig(root=root))
    for i in range(n):
        d, p = 8 * (i % 100 + 1), 128 * (i // 100)
        w = Workload(model="llama3-8b", num_decode=d, context_len=2048, prefill_tokens=p, dtype="bfloat16",
                     device="cuda")
        s = Schedule(split_sizes=(d // 2, d - d // 2 + (1 if p else 0)), streams=(StreamSpec(), StreamSpec()))
        store.save(StoredSchedule(hardware=H100, workload=w, schedule=s, verdict="winner", tokens_per_s=1.0,
                                  baseline_tokens_per_s=1.0, speedup=1.1, speedup_spread=0.01, efficiency=0.5,
                                  space="nanoflow"))


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fill(Path(tmp), 1000)
        t0 = time.perf_counter()
        ScheduleMap.load(tmp, model="llama3-8b", hardware=H100)
        cold = (time.perf_counter() - t0) * 1e3  # reads and validates every file, writes the pack
        pack = next(Path(tmp).rglob("*.pack.json"))
        packed_mb = pack.stat().st_size / 1e6
        loads, floors = [], []
        for _ in range(7):
            t0 = time.perf_counter()
            smap = ScheduleMap.load(tmp, model="llama3-8b", hardware=H100)
            loads.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            json.loads(pack.read_bytes().partition(b"\n")[2])  # the floor: reading the same records
            floors.append((time.perf_counter() - t0) * 1e3)
        rng = random.Random(0)
        shapes = [(rng.randint(1, 900), rng.choice([0, 1])) for _ in range(10_000)]
        distinct = list(dict.fromkeys(shapes))
        layouts = [preset_layout(d, p, 512) for d, p in distinct]
        t0 = time.perf_counter()
        for d, p in distinct:  # first sight of each shape: search the buckets and fit
            smap.pick_counts(d, p, 512, 2048)
        first_us = (time.perf_counter() - t0) / len(distinct) * 1e6
        t0 = time.perf_counter()
        for d, p in shapes:  # steady state: every shape seen before
            smap.pick_counts(d, p, 512, 2048)
        repeat_us = (time.perf_counter() - t0) / len(shapes) * 1e6
        cache = {(d, p, 512, 2048): None for d, p in shapes}
        t0 = time.perf_counter()
        for d, p in shapes:  # the floor of a repeated lookup: one dict lookup by the same key
            cache[(d, p, 512, 2048)]
        dict_us = (time.perf_counter() - t0) / len(shapes) * 1e6
        fresh = ScheduleMap.load(tmp, model="llama3-8b", hardware=H100)
        t0 = time.perf_counter()
        for layout in layouts:  # the general path: a full BatchLayout per step
            fresh.pick(layout, 2048)
        layout_us = (time.perf_counter() - t0) / len(layouts) * 1e6
    load, floor = statistics.median(loads), statistics.median(floors)
    print(f"store of {len(smap.raw)} schedules ({packed_mb:.1f} MB packed)")
    print(f"load     {cold:7.1f} ms cold: every file read and validated, pack written")
    print(f"load     {load:7.1f} ms from the pack (median of 7; target < 25 ms); json.loads of the same records "
          f"{floor:.1f} ms: {load / floor:.2f}x the floor")
    print(f"lookup   {first_us:7.2f} us per new shape (pick_counts, {len(distinct)} distinct shapes, each at first "
          "sight; target < 50 us)")
    print(f"lookup   {repeat_us:7.2f} us per lookup of a shape seen before (pick_counts, 10,000 lookups; target < 10 us);"
          f" a dict lookup {dict_us:.2f} us: {repeat_us / dict_us:.1f}x the floor")
    print(f"lookup   {layout_us:7.2f} us per new shape through pick (a BatchLayout of up to 901 requests, first sight)")

if __name__ == "__main__":
    main()
