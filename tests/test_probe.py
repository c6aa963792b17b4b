"""The GPU probe without a GPU: one line saying so, exit 3, nothing else attempted."""
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the probe runs its checks")
def test_probe_without_a_gpu_says_so_in_one_line():
    done = subprocess.run([sys.executable, "-m", "dynaflow.runtime.probe"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout.splitlines() == [done.stdout.strip()] and done.stdout.startswith("probe: no GPU: torch ")
    assert done.stderr == ""
