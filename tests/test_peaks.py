"""One source for device peaks: measured once per hardware, cached in the store, shared by every
command and process; --remeasure-peaks renews it; a corrupt cache is named and replaced."""
import json
import subprocess
import sys

import pytest
import torch

from dynaflow.runtime import detect
from dynaflow.runtime.hardware import _PEAKS, measure_peaks


def _ops(store, *extra) -> str:
    cmd = [sys.executable, "-m", "dynaflow.tuner.cli", "ops", "--model", "llama-tiny", "--workload", "d4x16",
           "--store", str(store), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.splitlines()[0], done.stderr


def test_repeated_ops_runs_print_the_same_balance_until_renewed(tmp_path):
    """Each process reads the cached balance, unless it says it renewed it (the cache was taken
    under contention, or a quick check beat it: on a loaded machine either may happen)."""
    runs = [_ops(tmp_path) for _ in range(3)]
    assert all("machine balance" in line for line, _ in runs)
    for (before, _), (line, said) in zip(runs, runs[1:]):
        if "measured again" in said:
            assert "contradicted by a quick check" in said or "measured under contention" in said, said
        else:
            assert line == before  # one cached measurement, shared
    [cache] = (tmp_path / "peaks").glob("*_float32.json")
    before = json.loads(cache.read_text())
    _ops(tmp_path, "--remeasure-peaks")
    assert json.loads(cache.read_text()) != before  # measured again (timings never repeat to the last bit)
    assert oct(cache.stat().st_mode & 0o777) == "0o644"


def test_a_corrupt_peaks_cache_is_named_and_measured_again(tmp_path):
    hw = detect("cpu")
    path = tmp_path / f"{hw.key}_float32.json"
    path.write_text("{not json")
    _PEAKS.clear()
    with pytest.warns(UserWarning, match=f"peaks cache {path} is not valid JSON"):
        peaks = measure_peaks("cpu", torch.float32, hardware=hw, cache_dir=tmp_path)
    assert peaks.balance > 0 and json.loads(path.read_text())["flops_per_s"] == peaks.flops_per_s


def _cache(tmp_path, **fields):
    hw = detect("cpu")
    path = tmp_path / f"{hw.key}_float32.json"
    path.write_text(json.dumps({"flops_per_s": 1e11, "bytes_per_s": 3e10, "dtype": "float32", **fields}))
    _PEAKS.clear()
    return hw, path


def test_peaks_cached_under_contention_are_measured_again_with_a_line_saying_so(tmp_path):
    busy = {"wall_s": 1.0, "others_cpu_s": 1.2, "cpus": 2, "load1": 5.0}  # others took 60% of the CPUs
    hw, path = _cache(tmp_path, busy=busy, flops_per_s=1e6, bytes_per_s=1e6)  # far below anything measured now
    with pytest.warns(UserWarning, match=r"were measured under contention \(other processes used 60% of the 2 CPU"):
        peaks = measure_peaks("cpu", torch.float32, hardware=hw, cache_dir=tmp_path)
    assert json.loads(path.read_text())["flops_per_s"] == peaks.flops_per_s != 1e6
    assert "others_cpu_s" in json.loads(path.read_text())["busy"]  # the new cache records its own load


def test_peaks_a_quick_check_contradicts_are_measured_again(tmp_path):
    hw, path = _cache(tmp_path, flops_per_s=1e6)  # far below anything this machine does
    with pytest.warns(UserWarning, match=r"contradicted by a quick check \(GEMM [0-9.]+x faster now\)"):
        peaks = measure_peaks("cpu", torch.float32, hardware=hw, cache_dir=tmp_path)
    assert peaks.flops_per_s > 1e8


def test_peaks_cached_quiet_and_confirmed_are_kept(tmp_path, recwarn):
    hw, path = _cache(tmp_path, flops_per_s=1e15, bytes_per_s=1e13, busy={"wall_s": 1.0, "others_cpu_s": 0.0, "cpus": 2})
    peaks = measure_peaks("cpu", torch.float32, hardware=hw, cache_dir=tmp_path)
    assert peaks.flops_per_s == 1e15 and not [w for w in recwarn if "peaks" in str(w.message)]


def test_peaks_under_contention_settle_after_three_attempts_keeping_the_highest(tmp_path, monkeypatch):
    """Contention only lowers a peak: each contended attempt keeps the higher of each peak, the
    next commands measure again only until 3 attempts, then the peaks are kept (and said to be)
    until --remeasure-peaks, so op classes stop moving between runs."""
    from dynaflow.runtime import hardware

    busy = {"wall_s": 1.0, "others_cpu_s": 1.2, "cpus": 2}
    draws = iter([(5e10, 2e10), (8e10, 1e10), (6e10, 3e10), (9e10, 4e10)])

    def contended(device, dtype, repeats=None):
        flops, nbytes = next(draws)
        return hardware.Peaks(flops_per_s=flops, bytes_per_s=nbytes, dtype="float32", busy=dict(busy))

    monkeypatch.setattr(hardware, "_run_peaks", contended)
    hw, said = detect("cpu"), []
    for _ in range(3):
        _PEAKS.clear()
        with pytest.warns(UserWarning) as caught:
            peaks = measure_peaks("cpu", torch.float32, hardware=hw, cache_dir=tmp_path)
        said.append(" ".join(str(w.message) for w in caught))
    assert (peaks.flops_per_s, peaks.bytes_per_s, peaks.attempts) == (8e10, 3e10, 3)  # the highest of each
    assert "the next 2 command(s) measure them again" in said[0] and "the next 1 command(s)" in said[1]
    assert "which are now kept (after 3 attempts) until --remeasure-peaks" in said[2]
    _PEAKS.clear()
    kept = measure_peaks("cpu", torch.float32, hardware=hw, cache_dir=tmp_path)  # no fourth measurement
    assert (kept.flops_per_s, kept.bytes_per_s) == (8e10, 3e10) and next(draws) == (9e10, 4e10)
