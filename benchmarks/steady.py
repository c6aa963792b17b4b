"""Does the same schedule run at the same speed from one process to the next, and beside other
schedules? (runtime/steady.py; docs/verdicts.md, "a known state"). Run it on a quiet machine:

    python benchmarks/steady.py                 # 10 fresh processes per figure (about 10 minutes here)
    python benchmarks/steady.py --processes 4   # a shorter look

Prints, side by side in one run:
1. the sequential schedule of each model in N fresh processes, measured as `measure` does (the known
   state) and with the allocator left as glibc sets it (before it): the max/min of the processes'
   figures (target for the first: at most 1.10), their page faults per run, and a control timed in
   the same processes (a 64 MiB copy: how much the host's memory bandwidth itself moved);
2. in one process, the sequential schedule measured right after each kind of candidate (capped,
   uncapped, four streams, a failed one) against it measured right before (target: within 5%);
3. `measure --rounds 5` of the capped [8, 8] schedule against sequential in N fresh processes: how
   many said "faster" (target: none);
4. with --tune, `tune --model hf:llama --workload d16x256 --trials 20` in a fresh store: its verdict,
   the best candidate's interval and its width, and the stored sequential figure against the
   sequential measured alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import statistics
import sys
import tempfile
from pathlib import Path

MODELS = (("hf:llama", "d16x256"), ("llama-small", "d16x256+p64"))

ONE_PROCESS = """
import statistics, sys, time, torch
from dynaflow.runtime import Bench, MeasureConfig, Schedule, steady
from dynaflow.tuner.paired import round_ms
from dynaflow.tuner.workloads import parse_workload
import dynaflow.runtime.hf.models  # noqa: F401 - the hf: models
model, workload, mode = sys.argv[1:4]
if mode == "before":  # the allocator as glibc sets it: what a measurement did before runtime/steady.py
    steady.keep_freed_memory = lambda: "uncontrolled (benchmark: before)"
bench = Bench(parse_workload(workload, model=model, dtype="float32", device="cpu"), config=MeasureConfig(repeats=10))
src = torch.randn(16 * 2**20)  # the control: a 64 MiB copy, timed between the schedule's measurements
dst = torch.empty_like(src)
schedule_ms, copy_ms, faults = [], [], []
for _ in range(3):
    m = bench.measure(Schedule())
    schedule_ms += m.samples_ms
    faults.append(m.state.faults_per_run)
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_ms.append((time.perf_counter() - t0) * 1e3)
print(round_ms(schedule_ms), round_ms(copy_ms), max(faults))
"""


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dynaflow.tuner.cli", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"dynaflow-tune {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout


def spread(figures: list[float]) -> str:
    return f"max/min {max(figures) / min(figures):.2f}  (" + ", ".join(f"{m:.1f}" for m in figures) + ")"


def across_processes(n: int) -> None:
    print(f"1. the sequential schedule in {n} fresh processes each (each process's figure: the lower quartile of "
          "30 runs; the control: a 64 MiB copy timed between them, in the same process: the host's memory bandwidth)")
    for model, workload in MODELS:
        print(f"   {model} {workload}")
        for mode, words in (("after", "known state (runtime/steady.py)"), ("before", "allocator as glibc sets it")):
            rows = [subprocess.run([sys.executable, "-c", ONE_PROCESS, model, workload, mode], capture_output=True,
                                   text=True, check=True).stdout.split() for _ in range(n)]
            ms, copy, faults = ([float(r[k]) for r in rows] for k in range(3))
            print(f"     {words}: {spread(ms)}\n       page faults per run (worst measurement per process): "
                  + ", ".join(f"{f:,.0f}" for f in faults)
                  + f"\n       control, 64 MiB copy: {spread(copy)}; schedule/control per process "
                  + spread([a / b for a, b in zip(ms, copy)]).split("  ")[0])


def beside_candidates() -> None:
    import torch

    from dynaflow.runtime import Bench, MeasureConfig, Schedule, StreamSpec
    from dynaflow.runtime.schedule import Step
    from dynaflow.tuner.paired import round_ms
    from dynaflow.tuner.workloads import parse_workload
    import dynaflow.runtime.hf.models  # noqa: F401

    model, workload = MODELS[0]
    bench = Bench(parse_workload(workload, model=model, dtype="float32", device="cpu"), config=MeasureConfig())
    names = [op.name for op in bench.executor.graph.ops]

    def streams(splits, shares, label):
        order = tuple(Step(op=n, nano=k, stream=k) for k in range(len(splits)) for n in names)
        return Schedule(split_sizes=splits, streams=tuple(StreamSpec(sm_share=s) for s in shares), order=order,
                        label=label)

    def failing():  # a candidate whose second stream raises: the measure is CRASHED
        s = streams((8, 8), (1, 1), "failed")
        compiled = bench.executor.compile(s)
        k = next(i for i, t in enumerate(compiled.plan.tasks) if t.stream == 1)
        compiled.plan.tasks[k] = dataclasses.replace(compiled.plan.tasks[k], fn=lambda: 1 / 0)
        try:
            compiled()
        except ZeroDivisionError:
            pass
        finally:
            compiled.close()

    print(f"2. in one process ({model} {workload}, {torch.get_num_threads()} threads): the sequential schedule measured "
          "right after each kind of candidate / right before it (median of 3 such pairs)")
    kinds = {"capped [8, 8] (1+1 threads)": streams((8, 8), (1, 1), "capped"),
             "uncapped [8, 8]": streams((8, 8), (None, None), "uncapped"),
             "four streams [4]*4": streams((4, 4, 4, 4), (None,) * 4, "four"), "failed": None}
    for label, schedule in kinds.items():
        ratios, states = [], []
        for _ in range(3):
            before = bench.measure(Schedule())
            failing() if schedule is None else bench.measure(schedule)
            after = bench.measure(Schedule())
            ratios.append(round_ms(after.samples_ms) / round_ms(before.samples_ms))
            states.append(after.state)
        print(f"   after {label:<28} {statistics.median(ratios):.3f}x  ({', '.join(f'{r:.3f}' for r in ratios)}; "
              f"threads {sorted({t for st in states for t in st.threads})}, "
              f"{max(st.faults_per_run for st in states):.0f} page faults per run at most)")


def capped_rounds(n: int, store: str) -> None:
    model, workload = MODELS[0]
    with tempfile.TemporaryDirectory() as tmp:
        from dynaflow.runtime import Schedule, StreamSpec
        from dynaflow.runtime.schedule import Step
        from dynaflow.tuner.workloads import parse_workload
        import dynaflow.runtime.hf.models  # noqa: F401

        graph = parse_workload(workload, model=model, dtype="float32", device="cpu").build().graph
        order = tuple(Step(op=op.name, nano=k, stream=k) for k in (0, 1) for op in graph.ops)
        path = Path(tmp) / "capped.json"
        path.write_text(Schedule(split_sizes=(8, 8), streams=(StreamSpec(sm_share=1), StreamSpec(sm_share=1)),
                                 order=order, label="capped").to_json())
        results = [json.loads(cli("measure", "--model", model, "--workload", workload, "--schedule", str(path),
                                  "--rounds", "5", "--json", "--store", store)) for _ in range(n)]
    faster = sum(r["result"].split(":")[1].strip().startswith("faster") for r in results)
    print(f"3. measure --rounds 5, capped [8, 8] against sequential, {n} fresh processes: {faster} said faster")
    for r in results:
        print(f"   {r['result']}")


def tuned(store: str) -> None:
    out = cli("tune", "--model", "hf:llama", "--workload", "d16x256", "--trials", "20", "--no-progress",
              "--store", store, "--storage", f"sqlite:///{store}/studies.db")
    print("4. tune --model hf:llama --workload d16x256 --trials 20 (a fresh store)")
    print("   " + "\n   ".join(out.strip().splitlines()))
    record = json.loads(next(Path(store, "schedules").rglob("hf-llama*.json")).read_text())
    if record.get("speedup_interval"):
        low, high = record["speedup_interval"]
        print(f"   best candidate's interval {low:.3f}-{high:.3f}x over {record.get('rounds')} rounds: width {high - low:.3f}")
    alone = [json.loads(cli("measure", "--model", "hf:llama", "--workload", "d16x256", "--json", "--store", store))
             ["measurement"]["tokens_per_s"] for _ in range(3)]
    stored, measured = record["baseline_tokens_per_s"], statistics.median(alone)
    print(f"   stored sequential figure {stored:,.0f} tokens/s / measured alone {measured:,.0f} tokens/s (median of 3 "
          f"fresh processes: {', '.join(f'{a:,.0f}' for a in alone)}) = {stored / measured:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=10)
    p.add_argument("--tune", action="store_true", help="also tune hf:llama d16x256 (about 2 minutes)")
    args = p.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)
    with tempfile.TemporaryDirectory() as store:
        across_processes(args.processes)
        beside_candidates()
        capped_rounds(args.processes, store)
        if args.tune:
            tuned(store)


if __name__ == "__main__":
    main()
