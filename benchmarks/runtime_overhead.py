"""Sequential schedule through the runtime vs the plain eager model, same model and batch.

    python benchmarks/runtime_overhead.py                       # CPU: llama3-8b layer, d8x256+p32
    python benchmarks/runtime_overhead.py --device cuda --workload d256x2048+p512

Target: runtime / eager <= 1.03x. Prints both medians and the ratio, measured side by side.
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

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    s = interleaved_ms({"eager": eager, "runtime": run}, sync, warmup=3, repeats=args.repeats)
    e, r = median(s["eager"]), median(s["runtime"])
    print(f"workload {w.key} on {args.device}, {args.repeats} interleaved repeats, {len(ex.graph.ops)} ops")
    print(f"eager    {e:8.3f} ms (median)")
    print(f"runtime  {r:8.3f} ms (median, sequential schedule)")
    print(f"ratio    {r / e:8.3f}x  (target <= 1.03x)")


if __name__ == "__main__":
    main()
