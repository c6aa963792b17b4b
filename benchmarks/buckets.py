"""More buckets per minute: `tune --shapes FILE --buckets 16` with the performance model against
`--buckets 4` searched blind (`--no-model`, the tuner before the model), on the same recorded
shapes, on this machine, one after the other.

    python benchmarks/buckets.py                     # llama-small, ~6 min on 2 cores
    python benchmarks/buckets.py --many 8 --trials 10

The shapes: 16 that no bucket answers for another (decode requests 1-64 at a 128-token context,
prefill chunks of 16-256 tokens, and mixes), weighted as a server's log is (calls x tokens), so
the 4 buckets are the heaviest 4 of the 16. Each run is the command a user types, in a fresh
store (its peaks and profiles measured in it). Printed: each run's wall time, how many buckets
the model screened (measured only its top few, then a confirmation of their best) and how many it
searched in full, every bucket's verdict, and the ratio of the two times (target <= 1.00).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynaflow.runtime.shapes import Bucket, ShapeLog


def shapes(path: Path, model: str) -> Path:
    log = ShapeLog(model=model)
    for d in (1, 4, 16, 64):
        log.add(Bucket(num_decode=d, prefill_tokens=0, context_len=128), 40)
    for p in (16, 64, 256):
        log.add(Bucket(num_decode=0, prefill_tokens=p, context_len=0, num_prefill=1), 10)
    for d in (4, 16, 64):
        for p in (16, 64, 256):
            log.add(Bucket(num_decode=d, prefill_tokens=p, context_len=128, num_prefill=1), 10)
    return log.save(path)


def run(label: str, argv: list[str], folder: Path) -> dict:
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "dynaflow.tuner.cli", "tune", *argv, "--store", str(folder),
           "--storage", f"sqlite:///{folder}/studies.db", "--no-progress"]
    print(f"== {label}: dynaflow-tune tune {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = done.stdout + done.stderr
    if done.returncode != 0:
        print(out[-3000:])
        raise SystemExit(f"{label}: exit {done.returncode}")
    verdicts = [line for line in out.splitlines() if re.match(r"^\S+_fp32: ", line)]
    contradicted = out.count("the full search runs")  # screened, then searched in full
    screened = out.count("measuring only its top") - contradicted
    full = len(verdicts) - screened
    transferred = out.count("profile transferred from")
    measured = out.count("model: profile measured")
    for line in verdicts:
        print(f"   {line[:160]}")
    print(f"   {wall:.1f} s, {len(verdicts)} bucket(s); model screened {screened}, searched in full {full} "
          f"({contradicted} of them after a screen the measurements contradicted); "
          f"profiles: {measured} measured in full, {transferred} transferred", flush=True)
    return {"wall": wall, "buckets": len(verdicts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small")
    p.add_argument("--few", type=int, default=4, help="buckets searched blind (default 4)")
    p.add_argument("--many", type=int, default=16, help="buckets tuned with the model (default 16)")
    p.add_argument("--trials", type=int, default=30, help="--trials per bucket, both runs (default 30: tune's)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dynaflow-buckets-") as tmp:
        tmp = Path(tmp)
        f = shapes(tmp / "shapes.json", args.model)
        common = ["--shapes", str(f), "--model", args.model, "--trials", str(args.trials)]
        few = run(f"{args.few} buckets, blind", [*common, "--buckets", str(args.few), "--no-model"], tmp / "few")
        many = run(f"{args.many} buckets, the model", [*common, "--buckets", str(args.many)], tmp / "many")
    print(f"{many['buckets']} buckets with the model in {many['wall']:.1f} s; {few['buckets']} blind in {few['wall']:.1f} s: "
          f"{many['wall'] / few['wall']:.2f}x the time (target <= 1.00)")


if __name__ == "__main__":
    main()
