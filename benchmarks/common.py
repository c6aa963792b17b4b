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
