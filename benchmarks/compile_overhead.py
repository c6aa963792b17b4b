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
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import hf_generation, report_generation  # noqa: E402

from dynaflow.runtime import Schedule  # noqa: E402
from dynaflow.runtime.hf import compile_with_schedules  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    args, model, cfg, ids, run = hf_generation(__doc__)
    sequential = Schedule()
    compiled = compile_with_schedules(model, lambda layout: sequential)
    for batch in (args.requests, args.requests // 2, args.requests):  # compile; then other batch sizes
        run(compiled, batch)
    report_generation(args, {"eager": lambda: run(model), "schedule backend": lambda: run(compiled)}, target=1.05)
    print(f"  {'graphs':<16} {len(compiled.runners)} for batch sizes {args.requests} and {args.requests // 2}, "
          f"prefill and decode ({compiled.recompiles} recompile(s) after the first); "
          f"{len(compiled.runners[0].graph.ops)} ops in the first")


if __name__ == "__main__":
    main()
