"""A tune across a Ray cluster of N nodes started on this machine (a head and joined nodes, each a
Ray node of its own with one CPU, as `ray start --head` and `ray start --address` would make
them), the tuner joining it by address in another process with a model module only its folder
holds: prints the tuner's per-worker summary (trials per worker, each named with its node, and
the driver's time per trial) and the trials per node.

    python benchmarks/ray_cluster.py [--nodes 2] [--trials 24]
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_models import MODEL  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--trials", type=int, default=24)
    args = p.parse_args()
    from ray.cluster_utils import Cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "gcs_server_port": port,
                                                            "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "project"
            work.mkdir()
            (work / "bench_model.py").write_text(MODEL)
            env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
            cmd = [sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "bench_model:make_case",
                   "--workload", "d16x16", "--workers", str(args.nodes), "--ray-address", cluster.address,
                   "--trials", str(args.trials), "--confirm-rounds", "1", "--store", f"{tmp}/store",
                   "--storage", f"sqlite:///{tmp}/s.db", "--no-progress"]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
            wall = time.perf_counter() - t0
        if run.returncode != 0:
            sys.exit(f"ray_cluster: the tune failed (rc {run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
        summary = next(line for line in run.stdout.splitlines() if "trial(s) by worker" in line)
        per_node = Counter()
        for worker, counts in re.findall(r"(w\d+'*@\w+): ([^;]+)", summary):
            per_node[worker.split("@")[1]] += sum(int(n) for n in re.findall(r"\d+", counts))
        print(f"{args.nodes} nodes, {args.trials} trials, tune wall {wall:.1f} s (Ray start-up and the confirmation included)")
        print(summary)
        print("trials per node: " + ", ".join(f"{n} {c}" for n, c in sorted(per_node.items())))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
