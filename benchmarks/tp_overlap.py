"""Tensor parallelism: a schedule that overlaps one nano-batch's all-reduce with another's compute,
against the sequential TP run, measured side by side on the same group, per batch size; the
speedup is the sequential time over the overlap's (below 1: overlapping does not pay).

    python benchmarks/tp_overlap.py                                  # llama-small, TP-2 on gloo (CPU)
    python benchmarks/tp_overlap.py --device cuda --tp 8 --model llama3-70b --tokens 64,256,1024

Each row: decode requests (one token each) at a short context; the layer is the preset's TP shard
on every rank, with its two all-reduces. The overlap schedule: two nano-batches of equal size,
every compute and memory op on stream 0 and the collectives on a stream of their own, op-major
(so the all-reduce of nano-batch 0 runs while nano-batch 1 computes). On a CPU both ranks share
the machine's cores, and gloo's threads compete with the GEMMs for them.
"""
from __future__ import annotations

import argparse
import statistics

from optuna.trial import FixedTrial

from dynaflow.runtime import MeasureConfig, Schedule
from dynaflow.search_spaces import get_space
from dynaflow.tuner.tp import TPTarget
from dynaflow.tuner.workloads import parse_workload

OVERLAP = {"num_nano": 2, "weight_0": 1, "weight_1": 1, "streams": "one", "network_stream": True, "stagger": 0,
           "partition": False, "prioritise_memory": False, "cuda_graph": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--tokens", default="16,64,256,1024", help="batch sizes (decode requests), comma-separated")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        w = parse_workload(f"d{tokens}x{args.context}", model=args.model, dtype=dtype, device=args.device, tp=args.tp)
        target = TPTarget(w, MeasureConfig(warmup=3, repeats=10))
        try:
            schedules = {"sequential": Schedule(), "overlap": get_space("nanoflow")(FixedTrial(OVERLAP),
                                                                                   target.space_context())}
            samples: dict[str, list[float]] = {k: [] for k in schedules}
            for _ in range(args.rounds):  # interleaved rounds: noise hits both alike
                for name, s in schedules.items():
                    m = target.measure(s)
                    if not m.ok:
                        raise SystemExit(f"{w.key} {name}: {m.outcome.value}: {m.message}")
                    samples[name].extend(m.samples_ms)
            seq, over = (statistics.median(samples[k]) for k in schedules)
            peaks = target.peaks
            network = sum(op.bytes for op in target.graph.ops if op.resource == "network")
            rows.append((tokens, seq, over, network / peaks.bus_bytes_per_s * 1e3))
            if len(rows) == 1:
                print(f"{args.model} TP-{args.tp} on {target.hardware.key} ({args.device}, {dtype}), decode at context "
                      f"{args.context}; all-reduce bus bandwidth {peaks.bus_bytes_per_s / 1e9:.2f} GB/s measured; "
                      f"overlap schedule: {schedules['overlap'].label}; median of {args.rounds} interleaved rounds "
                      f"of 10 runs")
                print(f"  {'tokens':>6} {'sequential ms':>14} {'overlap ms':>11} {'speedup':>8} "
                      f"{'network bound ms':>17}")
            print(f"  {tokens:>6} {seq:>14.3f} {over:>11.3f} {seq / over:>7.2f}x {rows[-1][3]:>17.3f}", flush=True)
        finally:
            target.close()


if __name__ == "__main__":
    main()
