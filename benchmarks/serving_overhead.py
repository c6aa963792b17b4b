"""What serving under a ScheduleMap costs when the map answers sequential: an HF Llama's
generation with every decoder layer wrapped (apply_schedules with a map of no schedules) vs the
unwrapped model, interleaved; and the time the wrapper adds per decoder-layer call, measured on
a layer that does nothing (so only the lookup, the shape count and the call remain).

    python benchmarks/serving_overhead.py                 # llama-small sizes, 4 layers, cpu
    python benchmarks/serving_overhead.py --device cuda --dtype bfloat16

Targets: generation <= 1.03x of unscheduled; the added time per layer call, in microseconds.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import hf_generation, report_generation  # noqa: E402

from dynaflow.runtime import ScheduleMap, apply_schedules, remove_schedules  # noqa: E402
from dynaflow.runtime.hf import ScheduledDecoderLayer  # noqa: E402


class Nothing(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def per_call_us(smap: ScheduleMap, calls: int = 20000) -> tuple[float, float]:
    """(plain call, wrapped call) in microseconds, for a decode step of 16 rows."""
    x = torch.zeros(16, 1, 8)
    plain, wrapped = Nothing(), ScheduledDecoderLayer(Nothing(), smap)
    best = {}
    for name, layer in (("plain", plain), ("wrapped", wrapped)) * 3:
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / calls * 1e6)
    return best["plain"], best["wrapped"]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    args, model, cfg, ids, run = hf_generation(__doc__)
    smap = ScheduleMap([], source="(no schedules)")  # every answer is the sequential fallback
    run(model)  # warm

    def scheduled() -> float:
        apply_schedules(model, smap)
        try:
            return run(model)
        finally:
            remove_schedules(model)

    report_generation(args, {"unscheduled": lambda: run(model), "sequential map": scheduled}, target=1.03)
    plain, wrapped = per_call_us(smap)
    print(f"  {'per layer call':<15} {wrapped - plain:9.2f} us added by the wrapper (lookup, shape count, call), "
          f"{wrapped:.2f} us wrapped vs {plain:.2f} us plain")


if __name__ == "__main__":
    main()
