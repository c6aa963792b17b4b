"""Verification never fails the sequential schedule, in any fresh process, and still catches a
schedule that computes the wrong thing."""
import json

import pytest
import torch

from dynaflow.runtime import Bench, MeasureConfig, Schedule, Workload
from dynaflow.runtime.batch import BatchLayout
from dynaflow.runtime.measure import Tolerance

# (model, workload spec, fresh processes): 20 processes over 3 workloads (one of llama3-8b's ~1 GB
# float32 layer, for its 14,336-term reduction; building it is most of this test's time)
RUNS = [("llama-small", "d24x256+p64", 12), ("llama3-8b", "d64x1024+p256", 1), ("mixtral-tiny", "d16x128+p64c16", 7)]


def sequential_in_this_process(model: str, spec: str, peaks_dir: str) -> dict:
    """Build the workload and measure the sequential schedule once: what a fresh process sees."""
    from pathlib import Path

    from dynaflow.tuner.workloads import parse_workload

    w = parse_workload(spec, model=model, dtype="float32", device="cpu")
    m = Bench(w, config=MeasureConfig(warmup=0, repeats=1, peaks_dir=Path(peaks_dir))).measure(Schedule())
    return {"outcome": m.outcome.value, "error": m.error_ratio, "tolerance": m.tolerance}


def test_the_sequential_schedule_passes_in_every_fresh_process(tmp_path):
    """Each run in its own process, forked from a server that imported torch and nothing more (no op
    has run there: the thread pools, the allocator's blocks and the kernels chosen are each child's
    own), two at a time: the machine's load varies too."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dynaflow.runtime", "dynaflow.tuner.workloads"])
    jobs = [(model, spec) for model, spec, n in RUNS for _ in range(n)]
    with ctx.Pool(2, maxtasksperchild=1) as pool:  # (not concurrent.futures: its max_tasks_per_child hangs on 3.11)
        pending = [pool.apply_async(sequential_in_this_process, (model, spec, str(tmp_path))) for model, spec in jobs]
        results = [(model, spec, p.get(timeout=300)) for (model, spec), p in zip(jobs, pending)]
    assert len(results) >= 20 and len({(m, s) for m, s, _ in results}) >= 3
    bad = [(m, s, r) for m, s, r in results if r["outcome"] != "ok"]
    assert not bad, f"the sequential schedule failed verification: {bad}"
    tol = {(m, s): r["tolerance"] for m, s, r in results}
    assert tol[("llama3-8b", "d64x1024+p256")]["reduction"] == 14336  # the down projection's inner dimension


def test_the_tolerance_follows_the_dtype_and_the_reductions():
    ref = torch.ones(4, 8)
    fp32 = Tolerance.derive(torch.float32, reduction=4096, depth=9, reference=ref)
    assert fp32.rtol == pytest.approx(4096 * torch.finfo(torch.float32).eps + 3 * torch.finfo(torch.float32).eps)
    assert fp32.atol == pytest.approx(fp32.rtol * 1.0)  # rms of the reference is 1
    bf16 = Tolerance.derive(torch.bfloat16, reduction=4096, depth=9, reference=ref)
    assert bf16.rtol > 10 * fp32.rtol
    assert Tolerance.derive(torch.float32, reduction=16384, depth=9, reference=ref).rtol > 3 * fp32.rtol


@pytest.fixture(scope="module")
def bench():
    return Bench(Workload(model="llama-small", num_decode=12, context_len=64), config=MeasureConfig(warmup=0, repeats=2))


def test_a_wrong_split_still_fails(bench, monkeypatch):
    """Nano-batches fed views one row too early (an off-by-one in the split) are INCORRECT."""
    honest = BatchLayout.split_inputs

    def off_by_one(self, inputs, r0, r1):
        views = honest(self, inputs, r0, r1)
        if r0 == 0:
            return views
        shifted = honest(self, inputs, r0 - 1, r1 - 1)
        return tuple(s if v.shape == s.shape else v for v, s in zip(views, shifted))

    monkeypatch.setattr(BatchLayout, "split_inputs", off_by_one)
    m = bench.measure(Schedule(split_sizes=(6, 6)))
    assert m.outcome.value == "incorrect" and m.error_ratio > 10, m.summary()
    monkeypatch.setattr(BatchLayout, "split_inputs", honest)
    assert bench.measure(Schedule(split_sizes=(6, 6))).ok


def test_flags_replace_the_derived_tolerance_and_bad_values_name_the_flag(tmp_path):
    from dynaflow.tuner.cli import main

    with pytest.raises(ValueError, match="--rtol must be a finite number >= 0, but got -1"):
        MeasureConfig(rtol=-1.0)
    args = ["measure", "--model", "llama-tiny", "--workload", "d4x16", "--repeats", "1", "--warmup", "0",
            "--rtol", "0", "--atol", "0.5", "--store", str(tmp_path), "--json"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    tol = json.loads(buf.getvalue())["measurement"]["tolerance"]
    assert tol["rtol"] == 0 and tol["atol"] == 0.5 and tol["reduction"] == 128  # derived K kept for the record
