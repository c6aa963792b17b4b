"""Shared by the benchmark scripts: interleaved timing, so noise hits both sides alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_ms(fns: dict[str, Callable[[], object]], sync: Callable[[], None], *,
                   warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time each fn `repeats` times, round-robin, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def hf_generation(doc: str):
    """The flags and the model of the HF-generation benchmarks: an HF Llama with a preset's sizes.
    Returns (args, model, cfg, ids, run), run(model, batch=None) -> tokens/s of one generation."""
    import argparse
    import pathlib
    import sys

    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
    from serve import generate, hf_model

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    device = torch.device(args.device)
    model, cfg = hf_model(args.model, args.layers, device, getattr(torch, args.dtype))
    ids = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt), device=device)

    def run(m, batch: int | None = None) -> float:
        return generate(m, cfg, ids[:batch], args.new_tokens, device)

    return args, model, cfg, ids, run


def report_generation(args, fns: dict[str, Callable[[], float]], target: float) -> None:
    """Run each generation `args.rounds` times, interleaved, and print tokens/s per row and the
    time ratio of the second row to the first."""
    rows: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            rows[name].append(fn())
    print(f"HF Llama ({args.model} sizes, {args.layers} layers), {args.requests} requests x {args.prompt} prompt, "
          f"{args.new_tokens} new tokens, {args.device} {args.dtype}, median of {args.rounds} interleaved rounds")
    width = max(15, *(len(n) for n in rows))
    for name, tps in rows.items():
        print(f"  {name:<{width}} {statistics.median(tps):9.1f} tokens/s (min {min(tps):.1f}, max {max(tps):.1f})")
    base, other = rows
    ratio = statistics.median(rows[base]) / statistics.median(rows[other])
    print(f"  {'time ratio':<{width}} {ratio:9.3f}x  ({other} / {base}; target <= {target:.2f}x)")
