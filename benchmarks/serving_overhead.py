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
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
from serve import generate, hf_model  # noqa: E402

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, cfg = hf_model(args.model, args.layers, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt), device=device)
    smap = ScheduleMap([], source="(no schedules)")  # every answer is the sequential fallback
    generate(model, cfg, ids, 2, device)  # warm
    rows: dict[str, list[float]] = {"unscheduled": [], "sequential map": []}
    for _ in range(args.rounds):
        rows["unscheduled"].append(generate(model, cfg, ids, args.new_tokens, device))
        apply_schedules(model, smap)
        rows["sequential map"].append(generate(model, cfg, ids, args.new_tokens, device))
        remove_schedules(model)
    print(f"HF Llama ({args.model} sizes, {args.layers} layers), {args.requests} requests x {args.prompt} prompt, "
          f"{args.new_tokens} new tokens, {args.device} {args.dtype}, median of {args.rounds} interleaved rounds")
    for name, tps in rows.items():
        print(f"  {name:<15} {statistics.median(tps):9.1f} tokens/s (min {min(tps):.1f}, max {max(tps):.1f})")
    ratio = statistics.median(rows["unscheduled"]) / statistics.median(rows["sequential map"])
    print(f"  time ratio      {ratio:9.3f}x  (sequential map / unscheduled; target <= 1.03x)")
    plain, wrapped = per_call_us(smap)
    print(f"  per layer call  {wrapped - plain:9.2f} us added by the wrapper (lookup, shape count, call), "
          f"{wrapped:.2f} us wrapped vs {plain:.2f} us plain")


if __name__ == "__main__":
    main()
