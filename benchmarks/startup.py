"""Start-up: load a store of 1,000 schedules and answer 10,000 lookups of live batch shapes.

    python benchmarks/startup.py

Targets: under 50 ms to load, under 10 us per lookup. Lookups mix repeated shapes (the
steady state of a server) and new ones; both are reported.
"""
from __future__ import annotations

import argparse
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
        loads = []
        for _ in range(5):
            t0 = time.perf_counter()
            smap = ScheduleMap.load(tmp, model="llama3-8b", hardware=H100)
            loads.append((time.perf_counter() - t0) * 1e3)
        rng = random.Random(0)
        shapes = [(rng.randint(1, 900), rng.choice([0, 1])) for _ in range(10_000)]
        layouts = [preset_layout(d, p, 512) for d, p in shapes]
        t0 = time.perf_counter()
        for d, p in shapes:  # first sight of each shape: search the buckets and fit
            smap.pick_counts(d, p, 512, 2048)
        first_us = (time.perf_counter() - t0) / len(shapes) * 1e6
        t0 = time.perf_counter()
        for d, p in shapes:  # steady state: every shape seen before
            smap.pick_counts(d, p, 512, 2048)
        repeat_us = (time.perf_counter() - t0) / len(shapes) * 1e6
        t0 = time.perf_counter()
        for layout in layouts:  # the general path: a full BatchLayout per step
            smap.pick(layout, 2048)
        layout_us = (time.perf_counter() - t0) / len(layouts) * 1e6
    print(f"store of {len(smap.raw)} schedules")
    print(f"load     {cold:7.1f} ms cold: every file read and validated, pack written")
    print(f"load     {statistics.median(loads):7.1f} ms from the pack (median of 5; target < 50 ms)")
    print(f"lookup   {first_us:7.2f} us per lookup (pick_counts), 10,000 lookups, {len(set(shapes))} distinct shapes, "
          "first sight")
    print(f"lookup   {repeat_us:7.2f} us per lookup (pick_counts), the same 10,000 again (target < 10 us)")
    print(f"lookup   {layout_us:7.2f} us per lookup (pick with a BatchLayout of up to 901 requests, first sight)")


if __name__ == "__main__":
    main()
