"""How many trials TPE, random and grid search need to come within 2% (and 0.5%, and all the way)
of the exhaustive optimum, on a deterministic landscape: the nanoflow space (on a finite grid of
its parameters) at llama3-8b dimensions, each schedule's latency from benchmarks/costmodel.py.
With `--tp N` the landscape is one rank's TP-N shard with its all-reduces over NVLink (the cost
model's network term), and the grid adds the network stream.

    python benchmarks/search_efficiency.py [--workload d256x2048+p512] [--seeds 5] [--budget 200]
    python benchmarks/search_efficiency.py --model llama3-70b --tp 8

A trial counts as the tuner counts it: a distinct schedule (a re-proposed one is told its known
value and not counted; after two in a row the next proposal is drawn at random, as in
tuner/search.py). Beside the trials-to-target table it prints Kernel Tuner's performance score
(Willemsen et al., "A methodology for comparing optimization algorithms for auto-tuning", 2024):
at each budget t, P(t) = (b(t) - f(t)) / (b(t) - f_opt), where f(t) is the sampler's best latency
after t distinct schedules, f_opt the optimum and b(t) the expected best of random search (t
distinct schedules); the score is the mean
of P over t = 1..T, the cutoff where b(t) has come 95% of the way from the median schedule's
latency to the optimum (past it, b(t) - f_opt is so small that noise in f dominates). 0 is
random search, 1 finds the optimum at once, below 0 is worse.
Random search here is what Optuna's random sampler does on this define-by-run space, counted by
distinct schedule (many parameter settings give the same schedule, and not uniformly), so b(t)
is the mean over 100 runs of that sampler (other seeds than the compared runs).

Target: TPE within 5% of the grid's size; TPE needs fewer trials than random to reach 0.5% and
the optimum.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from costmodel import op_cost, simulate  # noqa: E402

from dynaflow.runtime import PRESETS, BatchLayout, Executor, Hardware, Op, OpGraph, Schedule, Workload, trace  # noqa: E402
from dynaflow.runtime.models.llama import LlamaLayer  # noqa: E402
from dynaflow.search_spaces import SpaceContext, get_space  # noqa: E402
from dynaflow.tuner.workloads import parse_workload  # noqa: E402

H100 = Hardware(kind="cuda", name="NVIDIA H100 80GB HBM3", arch="9.0", num_sms=132, memory_bytes=80 * 2**30)
GRID = {"num_nano": [1, 2, 3], "weight_0": [1, 2, 3], "weight_1": [1, 2, 3], "weight_2": [1, 2, 3],
        "streams": ["one", "compute|rest", "compute|memory|copy", "per-nano"], "stagger": [0, 1, 2, 4],
        "partition": [False, True], "sm_steps_0": [4, 8, 12], "sm_steps_1": [4, 8, 12], "sm_steps_2": [4, 8, 12],
        "prioritise_memory": [False], "cuda_graph": [False]}


class OnGrid:
    """Restricts a trial's suggestions to the grid's values, so every sampler searches the same finite space."""

    def __init__(self, trial, values: dict) -> None:
        self.trial, self.values = trial, values

    def suggest_int(self, name, low, high):
        return self.trial.suggest_categorical(name, self.values[name])

    def suggest_categorical(self, name, choices):
        return self.trial.suggest_categorical(name, self.values[name])


def grid(tp: int) -> dict:
    """GRID, and with tensor parallelism whether collectives get a stream of their own."""
    return {**GRID, "network_stream": [False, True]} if tp > 1 else GRID


def context(w: Workload) -> SpaceContext:
    """Op names and dependencies traced from the tiny preset (its TP-2 shard's, with the all-reduces,
    when w.tp > 1: tracing runs no collective); resources and costs at full size, on one rank."""
    if w.tp > 1:
        tiny = trace(LlamaLayer(PRESETS["llama-tiny"].shard(2), tp=2))
    else:
        tiny = Executor(Workload(model="llama-tiny", num_decode=2, context_len=4, prefill_tokens=4).build()).graph
    ops = []
    for op in tiny.ops:
        cost = op_cost(op.name, w.model, w.num_decode, w.context_len, w.num_prefill, w.chunk, w.tp)
        resource = "copy" if cost.flops == 0 and cost.bytes == 0 and not cost.network else cost.resource
        ops.append(Op(name=op.name, deps=op.deps, flops=cost.flops, bytes=cost.bytes, resource=resource))
    layout = BatchLayout(request_tokens=(1,) * w.num_decode + (w.chunk,) * w.num_prefill,
                         request_kinds=("decode",) * w.num_decode + ("prefill",) * w.num_prefill,
                         input_axes=(), kinds=("decode", "prefill"))
    return SpaceContext(hardware=H100, graph=OpGraph(ops=tuple(ops), module=tiny.module, writes_output=True),
                        layout=layout)


class Landscape:
    def __init__(self, w: Workload) -> None:
        self.w, self.ctx, self.space, self.grid = w, context(w), get_space("nanoflow"), grid(w.tp)
        self.deps = {op.name: op.deps for op in self.ctx.graph.ops}
        self.cache: dict[str, float] = {}

    def key(self, trial) -> str:
        """The trial's schedule (as the tuner keys it: without its label), its latency cached."""
        schedule = self.space(OnGrid(trial, self.grid), self.ctx)
        key = schedule.key()
        if key not in self.cache:
            self.cache[key] = simulate(schedule, self.ctx.graph.names, self.deps, self.ctx.layout,
                                       self.w.model, self.w.context_len, self.w.tp)
        return key

    def latency(self, trial) -> float:
        return self.cache[self.key(trial)]


def exhaustive(land: Landscape) -> tuple[float, float, list[str]]:
    """The optimum, the sequential latency, and the schedule key of every grid point."""
    names = list(land.grid)
    points = list(itertools.product(*land.grid.values()))
    keys = [land.key(optuna.trial.FixedTrial(dict(zip(names, p)))) for p in points]
    lat = [land.cache[k] for k in keys]
    sequential = land.latency(optuna.trial.FixedTrial({"num_nano": 1, "weight_0": 1, "streams": "one", "stagger": 0,
                                                       "prioritise_memory": False, "cuda_graph": False,
                                                       "network_stream": False}))
    return min(lat), sequential, keys


def describe(land: Landscape, key: str) -> str:
    """What a schedule (by its key) does: nano-batches, streams, and where the collectives run."""
    s = Schedule.from_dict(json.loads(key))
    network = {step.stream for step in s.order if land.ctx.graph.op(step.op).resource == "network"}
    others = {step.stream for step in s.order} - network
    where = ("; collectives on a stream of their own" if network and not network & others
             else "; collectives share a stream" if network else "")
    return (f"{s.num_nano} nano-batch(es) {list(s.split_sizes) or ''}, {len(s.streams)} stream(s), SM shares "
            f"{[x.sm_share for x in s.streams]}{where}")


TARGETS = {"within 2%": 0.02, "within 0.5%": 0.005, "to the optimum": 0.0}


def search_curve(land: Landscape, sampler, optimum: float, limit: int, seed: int) -> list[float]:
    """Best latency after each distinct schedule, until the optimum is found or `limit` distinct."""
    study = optuna.create_study(sampler=sampler, direction="minimize")
    seen: dict[str, float] = {}
    curve, repeats = [], 0
    while len(curve) < limit and (not curve or curve[-1] > optimum):
        if repeats >= 2:  # the tuner's rule: a stuck sampler's next proposal is drawn at random
            study.sampler, kept = optuna.samplers.RandomSampler(seed=seed + len(study.trials)), study.sampler
        trial = study.ask()
        key = land.key(trial)
        if repeats >= 2:
            study.sampler = kept
        value = land.cache[key]
        study.tell(trial, value)
        if key in seen:
            repeats += 1
            continue
        seen[key], repeats = value, 0
        curve.append(min(value, curve[-1]) if curve else value)
    return curve


def trials_to(curve: list[float], target: float, limit: int) -> int:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), limit)


def random_baseline(land: Landscape, budget: int, runs: int = 100) -> list[float]:
    """Expected best latency of random search after t = 1..budget distinct schedules, estimated
    over `runs` runs of Optuna's random sampler (seeds apart from the compared runs')."""
    curves = [search_curve(land, optuna.samplers.RandomSampler(seed=10_000 + s), -math.inf, budget, 10_000 + s)
              for s in range(runs)]
    return [statistics.mean(c[t] for c in curves) for t in range(budget)]


def score(curve: list[float], baseline: list[float], optimum: float) -> float:
    """Kernel Tuner's performance score over the cutoff (see the module docstring)."""
    full = curve + [curve[-1]] * (len(baseline) - len(curve))
    return statistics.mean((b - f) / (b - optimum) for b, f in zip(baseline, full[:len(baseline)]) if b > optimum)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--workload", default="d256x2048+p512")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism: one rank's shard, its all-reduces over "
                   "NVLink (e.g. --model llama3-70b --tp 8)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=200, help="distinct schedules the random baseline is estimated over (the score's cutoff is within it)")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    w = parse_workload(args.workload, model=args.model, dtype="bfloat16", device="cpu", tp=args.tp)
    land = Landscape(w)
    t0 = time.perf_counter()
    best, sequential, keys = exhaustive(land)
    size = len(keys)
    print(f"{w.key}: grid of {size:,} points ({len(land.cache):,} distinct schedules), exhaustive in "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"sequential {sequential * 1e3:.3f} ms, optimum {best * 1e3:.3f} ms ({sequential / best:.3f}x): "
          f"{describe(land, min(land.cache, key=land.cache.get))}")
    samplers = {"tpe": lambda s: optuna.samplers.TPESampler(seed=s),
                "random": lambda s: optuna.samplers.RandomSampler(seed=s),
                "grid": lambda s: optuna.samplers.GridSampler(land.grid, seed=s)}
    limit = size // 20  # the target: 5% of the grid; a sampler that needs more is reported at the cap
    curves = {name: [search_curve(land, make(s), best, limit, s) for s in range(args.seeds)]
              for name, make in samplers.items()}
    for label, within in TARGETS.items():
        target = best / (1 - within) * (1 + 1e-12)  # within x of the optimum's tokens/s
        reach = sum(v <= target for v in land.cache.values())
        print(f"\nto come {label} ({reach} distinct schedule(s) qualify); distinct schedules per seed, capped at {limit}")
        print(f"{'sampler':<8} {'median trials':>14} {'of grid':>9}   per seed")
        for name in samplers:
            runs = [trials_to(c, target, limit) for c in curves[name]]
            med = statistics.median(runs)
            print(f"{name:<8} {med:>14.0f} {med / size:>9.2%}   {runs}")
    baseline = random_baseline(land, args.budget)
    median = statistics.median(land.cache[k] for k in keys)
    cutoff = next((t + 1 for t, b in enumerate(baseline) if b - best <= 0.05 * (median - best)), len(baseline))
    baseline = baseline[:cutoff]
    print(f"\nKernel Tuner's performance score over the first {cutoff} distinct schedules (the cutoff: random "
          f"search 95% of the way from the median {median * 1e3:.3f} ms to the optimum), 0 = random search, "
          f"1 = the optimum at once")
    for name in samplers:
        scores = [score(c, baseline, best) for c in curves[name]]
        print(f"{name:<8} {statistics.mean(scores):>6.3f} mean   {[round(x, 3) for x in scores]}")
    print("\ntargets: TPE's median within 5% of the grid's size (for coming within 2%); TPE fewer than random "
          "to 0.5% and to the optimum")

if __name__ == "__main__":
    main()
