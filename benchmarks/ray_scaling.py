"""Trials per second with 1, 2, 4 and 8 Ray actors, each measure sleeping a fixed time (so cores
do not bind), as a ratio to 1 actor; and the driver's own time per trial (ask, build, tell, dispatch).

    python benchmarks/ray_scaling.py [--sleep-ms 100] [--trials-per-worker 12]

Targets: throughput >= 0.9 x N, driver overhead < 5 ms per trial.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
sys.path.insert(0, TESTS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sleep-ms", type=float, default=100.0)
    p.add_argument("--trials-per-worker", type=int, default=20)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--storage", default="journal", choices=["journal", "sqlite"])
    args = p.parse_args()
    import optuna
    import ray

    from dynaflow.runtime import Workload
    from dynaflow.tuner.config import TuneConfig
    from dynaflow.tuner.progress import Progress
    from dynaflow.tuner.ray_fanout import GroupPool, PoolConfig, RayPool
    from dynaflow.tuner.search import Lane, run_search
    from dynaflow.tuner.study import open_study
    from dynaflow.tuner.session import search_config, study_config
    from fakes import make_sleeping_fake

    counts = [int(n) for n in args.workers.split(",")]
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS}})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    w = Workload(model="llama-tiny", num_decode=32, context_len=16, prefill_tokens=32, prefill_chunk=16)
    make = functools.partial(make_sleeping_fake, sleep_s=args.sleep_ms / 1e3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            trials = n * args.trials_per_worker
            # every trial a distinct schedule (random sampler over the nanoflow space, no dedupe hits)
            cfg = TuneConfig(workloads=(w,), space="nanoflow", trials=trials, sampler="random", seed=n,
                             storage=f"journal:{tmp}/n{n}.journal" if args.storage == "journal"
                             else f"sqlite:///{tmp}/n{n}.db", store_root=Path(tmp), progress=False,
                             trial_timeout_s=60)
            pool = RayPool(PoolConfig(workers=n), make)
            [group] = pool.groups(w).values()
            study = open_study(f"scaling-{n}", study_config(cfg))
            t0 = time.perf_counter()
            progress = Progress(total=None, desc="", enabled=False)
            [result] = run_search([Lane(study=study, pool=GroupPool(pool, group), context=group.context,
                                        progress=progress)], search_config(cfg))
            wall = time.perf_counter() - t0
            stats = result.stats
            measured = sum(c for cs in stats.per_worker.values() for c in cs.values())
            rows.append((n, trials, measured, measured / wall, stats.driver_s / trials * 1e3,
                         stats.study_s / trials * 1e3))
            pool.close()
    ray.shutdown()
    base = rows[0][3]
    print(f"measure sleeps {args.sleep_ms:g} ms; {args.trials_per_worker} trials per worker; {args.storage} storage")
    print("trials/s counts trials measured on workers (duplicates the driver answers itself are left out)")
    print(f"{'actors':>6} {'trials':>6} {'on workers':>10} {'trials/s':>9} {'vs 1 actor':>10} {'target':>7} "
          f"{'driver ms/trial':>15} {'of it Optuna':>12}")
    for n, trials, measured, tps, driver_ms, study_ms in rows:
        print(f"{n:>6} {trials:>6} {measured:>10} {tps:>9.2f} {tps / base:>9.2f}x {0.9 * n:>6.1f}x {driver_ms:>15.2f}"
              f" {study_ms:>12.2f}")
    print("driver ms/trial: ask, build, tell, dispatch and collect; 'of it Optuna': ask, suggest, tell with the storage")


if __name__ == "__main__":
    main()
