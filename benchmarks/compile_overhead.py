"""What running an HF model through the schedule backend costs when the schedule is sequential:
generation with `compile_with_schedules(model, sequential)` vs the plain eager model,
interleaved, and how many graphs dynamo made (recompiles) across batch sizes and steps.

    python benchmarks/compile_overhead.py                 # llama-small sizes, 4 layers, cpu
    python benchmarks/compile_overhead.py --device cuda --dtype bfloat16

Target: <= 1.05x the eager model's time; recompiles bounded (one graph per step kind).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
from serve import generate, hf_model  # noqa: E402

from dynaflow.runtime import Schedule  # noqa: E402
from dynaflow.runtime.dynamo import compile_with_schedules  # noqa: E402


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
    sequential = Schedule()
    compiled = compile_with_schedules(model, lambda layout: sequential)
    for batch in (args.requests, args.requests // 2, args.requests):  # compile; then other batch sizes
        generate(compiled, cfg, ids[:batch], args.new_tokens, device)
    rows: dict[str, list[float]] = {"eager": [], "schedule backend": []}
    for _ in range(args.rounds):
        rows["eager"].append(generate(model, cfg, ids, args.new_tokens, device))
        rows["schedule backend"].append(generate(compiled, cfg, ids, args.new_tokens, device))
    print(f"HF Llama ({args.model} sizes, {args.layers} layers), {args.requests} requests x {args.prompt} prompt, "
          f"{args.new_tokens} new tokens, {args.device} {args.dtype}, median of {args.rounds} interleaved rounds")
    for name, tps in rows.items():
        print(f"  {name:<17} {statistics.median(tps):9.1f} tokens/s (min {min(tps):.1f}, max {max(tps):.1f})")
    ratio = statistics.median(rows["eager"]) / statistics.median(rows["schedule backend"])
    print(f"  time ratio        {ratio:9.3f}x  (schedule backend, sequential / eager; target <= 1.05x)")
    print(f"  graphs            {len(compiled.runners)} for batch sizes {args.requests} and {args.requests // 2}, "
          f"prefill and decode ({compiled.recompiles} recompile(s) after the first); "
          f"{len(compiled.runners[0].graph.ops)} ops in the first")


if __name__ == "__main__":
    main()
