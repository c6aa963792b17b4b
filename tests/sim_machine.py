"""A simulated machine for testing the verdicts' statistics without timing anything.

Its clock advances by what each simulated sample takes. The load on it, as measured on the
2-core development machine beside other jobs: a slow drift nobody sees (clocks, caches, +-15%
over a minute or two), and contention episodes seconds long (2-10 s, one every ~15 s, times
x1.3-x3) which the machine's telemetry sees in most cases (others' CPU share) but not all (a
neighbour on the memory bus, say). Under an episode a candidate may run at another speed than
it does quiet (`loaded_ms`: capping threads wins under contention and loses quiet).
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from dynaflow.runtime import Measurement, Schedule, TrialOutcome
from dynaflow.search_spaces import SpaceContext


@dataclass(frozen=True, slots=True)
class Episode:
    start_s: float
    end_s: float
    factor: float
    seen: bool  # the telemetry reads others' CPU share during it


class Machine:
    def __init__(self, seed: int, *, episodes: bool = True, unseen: float = 0.3, drift: float = 0.15,
                 jitter: float = 0.02, horizon_s: float = 3600.0) -> None:
        self.rng = random.Random(seed)
        self.t = 0.0
        self.jitter = jitter
        self.drift, self.period_s, self.phase = drift, self.rng.uniform(60, 150), self.rng.uniform(0, 2 * math.pi)
        self.episodes: list[Episode] = []
        t = self.rng.expovariate(1 / 15)
        while episodes and t < horizon_s:
            length = self.rng.uniform(2, 10)
            self.episodes.append(Episode(t, t + length, self.rng.uniform(1.3, 3.0), self.rng.random() >= unseen))
            t += length + self.rng.expovariate(1 / 15)
        self.starts = [e.start_s for e in self.episodes]

    def episode(self, t: float) -> Episode | None:
        i = bisect.bisect_right(self.starts, t) - 1  # episodes do not overlap: only the last one started can hold t
        return self.episodes[i] if i >= 0 and t < self.episodes[i].end_s else None

    def sample_ms(self, quiet_ms: float, loaded_ms: float) -> float:
        """One run's time at the current instant; the clock moves on by it."""
        e = self.episode(self.t)
        base = loaded_ms * e.factor if e else quiet_ms
        ms = base * (1 + self.drift * math.sin(2 * math.pi * self.t / self.period_s + self.phase)) \
            * (1 + self.jitter * self.rng.gauss(0, 1))
        self.t += ms / 1e3
        return ms

    def seen_between(self, t0: float, t1: float) -> bool:
        first = max(bisect.bisect_right(self.starts, t0) - 1, 0)
        last = bisect.bisect_left(self.starts, t1)
        return any(e.seen and e.start_s < t1 and e.end_s > t0 for e in self.episodes[first:last])


class SimTarget:
    """A target on a simulated machine: `quiet_ms(schedule)` and `loaded_ms(schedule)` (default:
    the same) are a schedule's times at rest and under an episode. Each measure warms up, then
    times `repeats` samples, and reports the busy reading the real telemetry would."""

    def __init__(self, machine: Machine, ctx: SpaceContext, quiet_ms, loaded_ms=None, *, warmup: int = 3,
                 repeats: int = 15) -> None:
        self.machine, self.ctx, self.hardware = machine, ctx, ctx.hardware
        self.quiet_ms, self.loaded_ms = quiet_ms, loaded_ms or quiet_ms
        self.warmup, self.repeats = warmup, repeats

    def space_context(self) -> SpaceContext:
        return self.ctx

    def measure(self, schedule: Schedule, *, on_sample=None, time_limit_s=None) -> Measurement:
        quiet, loaded = self.quiet_ms(schedule), self.loaded_ms(schedule)
        for _ in range(self.warmup):
            self.machine.sample_ms(quiet, loaded)
        t0, samples = self.machine.t, []
        for _ in range(self.repeats):
            samples.append(self.machine.sample_ms(quiet, loaded))
            if on_sample is not None and on_sample(samples):
                return Measurement(outcome=TrialOutcome.PRUNED, samples_ms=tuple(samples))
        wall = self.machine.t - t0
        share = 0.6 if self.machine.seen_between(t0, self.machine.t) else 0.02
        median = sorted(samples)[len(samples) // 2]
        return Measurement(outcome=TrialOutcome.OK, latency_ms=median, latency_p10_ms=min(samples),
                           latency_p90_ms=max(samples), samples_ms=tuple(samples), tokens_per_s=1e3 / median,
                           telemetry={"busy": {"wall_s": wall, "others_cpu_s": share * wall * 2, "cpus": 2}})
