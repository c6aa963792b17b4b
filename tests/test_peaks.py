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
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return out.splitlines()[0]


def test_repeated_ops_runs_print_the_same_balance_until_renewed(tmp_path):
    first, second = _ops(tmp_path), _ops(tmp_path)
    assert "machine balance" in first and first == second  # two processes, one cached measurement
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
