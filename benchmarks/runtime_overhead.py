"""Sequential schedule through the runtime vs the plain eager model, same model and batch.

    python benchmarks/runtime_overhead.py                       # CPU: llama3-8b layer, d8x256+p32
    python benchmarks/runtime_overhead.py --device cuda --workload d256x2048+p512

Target: runtime / eager <= 1.03x. Prints both medians and the ratio, measured side by side; on
CUDA also under CUDA graphs, both sides alike (the eager model captured in one graph vs the
sequential schedule with cuda_graph=True).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_ms, median  # noqa: E402

from dynaflow.runtime import Executor, Schedule  # noqa: E402
from dynaflow.tuner.workloads import parse_workload  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--workload", default="d8x256+p32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    w = parse_workload(args.workload, model=args.model, dtype=dtype, device=args.device)
    ex = Executor(w.build())
    model, inputs = ex.case.model, ex.case.inputs
    run = ex.compile(Schedule())
    torch.testing.assert_close(run(), ex.reference(), rtol=0, atol=0)

    def eager() -> None:
        with torch.no_grad():
            model(*inputs)

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"workload {w.key} on {args.device}, {args.repeats} interleaved repeats, {len(ex.graph.ops)} ops")
    report("eager", {"eager": eager, "runtime": run}, sync, args.repeats)
    if cuda:
        graphed = ex.compile(Schedule(cuda_graph=True))
        torch.testing.assert_close(graphed(), ex.reference(), rtol=0, atol=0)
        report("CUDA graphs", {"eager": captured(eager), "runtime": graphed}, sync, args.repeats)
        graphed.close()


def captured(fn):
    """`fn` captured in one CUDA graph (after a warm-up on a side stream), replayed per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def report(mode: str, fns: dict, sync, repeats: int) -> None:
    s = interleaved_ms(fns, sync, warmup=3, repeats=repeats)
    e, r = median(s["eager"]), median(s["runtime"])
    print(f"{mode}:")
    print(f"  eager    {e:8.3f} ms (median)")
    print(f"  runtime  {r:8.3f} ms (median, sequential schedule)")
    print(f"  ratio    {r / e:8.3f}x  (target <= 1.03x)")


if __name__ == "__main__":
    main()
