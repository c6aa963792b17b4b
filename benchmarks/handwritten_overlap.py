"""A hand-written NanoFlow-style schedule vs the sequential one, measured side by side, with
the roofline efficiency of each; eager and, on a GPU, with CUDA graphs (both sides alike).

    python benchmarks/handwritten_overlap.py --device cuda                       # llama3-8b d256x2048+p512
    python benchmarks/handwritten_overlap.py --model llama-small --workload d16x256+p64   # CPU smoke run

The schedule: two nano-batches of about equal tokens, compute ops (GEMMs) on stream 0, memory ops
(decode attention, norms, rope, activation) on stream 1 at higher priority, nano-batch 1
trailing by two ops, and on a GPU SM partitions of about 80% + 20% of the partition groups the
driver grants (104 + 24 SMs on an H200's 16 groups of 8; fewer groups, smaller shares).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import optuna

from dynaflow.runtime import Bench, MeasureConfig, Schedule
from dynaflow.search_spaces import SpaceContext, get_space
from dynaflow.tuner.workloads import parse_workload


def handwritten(bench: Bench, *, cuda_graph: bool) -> Schedule:
    ctx = SpaceContext(hardware=bench.hardware, graph=bench.executor.graph, layout=bench.case.layout)
    return handwritten_schedule(ctx, cuda_graph=cuda_graph)


def handwritten_schedule(ctx: SpaceContext, *, cuda_graph: bool) -> Schedule:
    groups = ctx.sm_steps  # the partition steps this device's driver grants
    compute = max(1, round(groups * 0.8))
    params = {"num_nano": 2, "weight_0": 1, "weight_1": 1, "streams": "compute|rest", "stagger": 2,
              "partition": ctx.hardware.kind == "cuda" and groups >= 2, "sm_steps_0": min(compute, groups - 1),
              "sm_steps_1": max(1, groups - compute), "prioritise_memory": True, "cuda_graph": cuda_graph}
    schedule = get_space("nanoflow")(optuna.trial.FixedTrial(params), ctx)
    return dataclasses.replace(schedule, label="handwritten nanoflow" + (" +graph" if cuda_graph else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--workload", default="d256x2048+p512")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    w = parse_workload(args.workload, model=args.model, dtype=dtype, device=args.device)
    bench = Bench(w, config=MeasureConfig(warmup=3, repeats=10))
    modes = [False, True] if args.device.startswith("cuda") else [False]
    print(f"{w.key} on {bench.hardware.key}; roofline bound {bench.bound_ms:.3f} ms "
          f"(peaks {bench.peaks.flops_per_s / 1e9:,.0f} GFLOP/s, {bench.peaks.bytes_per_s / 1e9:,.0f} GB/s measured)")
    for graph in modes:
        schedules = {"sequential": Schedule(cuda_graph=graph, label="sequential"),
                     "handwritten": handwritten(bench, cuda_graph=graph)}
        samples = {k: [] for k in schedules}
        notes, peaks = {}, {}
        for _ in range(args.rounds):  # interleaved rounds
            for name, s in schedules.items():
                m = bench.measure(s)
                if not m.ok:
                    raise SystemExit(f"{name}: {m.outcome.value}: {m.message}")
                samples[name].extend(m.samples_ms)
                notes[name], peaks[name] = m.notes, m.peak_bytes
        seq, hand = (statistics.median(samples[k]) for k in schedules)
        print(f"\n{'CUDA graphs' if graph else 'eager'}:")
        for name, med in (("sequential", seq), ("handwritten", hand)):
            peak = f"{peaks[name] / 2**20:8.1f} MiB" if peaks[name] else "unknown"
            print(f"  {name:<12} {med:9.3f} ms  {w.num_tokens / med * 1e3:12,.0f} tokens/s  "
                  f"efficiency {bench.bound_ms / med:6.1%}  peak {peak}  {notes[name] or ''}")
        ratio = (f"{peaks['handwritten'] / peaks['sequential']:.2f}x" if peaks["handwritten"] and peaks["sequential"]
                 else "unknown (a peak was not measured)")
        print(f"  speedup      {seq / hand:9.3f}x   peak memory {ratio}")


if __name__ == "__main__":
    main()
