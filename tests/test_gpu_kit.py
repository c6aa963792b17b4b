"""The GPU kit's shell script, run here without a GPU: it fits its budget by its own estimate,
and whatever a stage does (here: overrun its timeout), the archive and summary come back."""
import re
import subprocess
import sys
import tarfile
from pathlib import Path


ROOT = Path(__file__).parents[1]
KIT = ROOT / "scripts" / "gpu_proof.sh"


def kit(tmp_path, *args, **env):
    import os

    full = {**os.environ, "PYTHON": sys.executable, "OUTDIR": str(tmp_path / "gpu"), "OUT": str(tmp_path / "out"),
            **env}
    return subprocess.run(["bash", str(KIT), *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def test_the_whole_kit_fits_nine_minutes_by_its_own_estimate(tmp_path):
    done = kit(tmp_path, "--estimate")
    assert done.returncode == 0, done.stderr
    m = re.search(r"stages probe,tests,overhead,overlap,profile,tune,report; estimate: at most (\d+) min (\d+) s", done.stdout)
    assert m and int(m[1]) * 60 + int(m[2]) <= 9 * 60, done.stdout
    assert not (tmp_path / "out").exists()  # an estimate writes nothing


def test_a_stage_past_its_timeout_still_leaves_the_archive_and_summary(tmp_path):
    done = kit(tmp_path, STAGES="collect", LIMITS="collect=1")
    assert done.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"^collect\s+TIMED OUT after 1 s", summary, re.M), summary
    with tarfile.open(tmp_path / "out" / "gpu_results.tgz") as tar:
        names = tar.getnames()
    assert "gpu/collect.txt" in names and "gpu/summary.txt" in names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_results.tgz", "summary.txt"]  # 2 files back


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    done = kit(tmp_path, STAGES="probe,bogus")
    assert done.returncode == 2 and "unknown stage 'bogus'" in done.stderr
    assert not (tmp_path / "gpu" / "probe.txt").exists()
