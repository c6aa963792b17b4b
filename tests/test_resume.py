"""A tuning process killed with SIGKILL mid-study, started again, loses no completed trial; the
trial it left running is failed by Optuna's heartbeat check, not by the next run's start."""
import os
import signal
import subprocess
import sys
import time

import optuna

from dynaflow.tuner.study import STALE, counts_toward_budget, result_of

CMD = [sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "llama-small", "--workload", "d4x64+p16",
       "--space", "nanoflow", "--trials", "14", "--repeats", "6", "--warmup", "1", "--no-prune",
       "--no-progress", "--confirm-rounds", "1", "--heartbeat-s", "1",  # stale after 3 silent seconds
       "--no-model"]  # the budget is what this file tests: no screen shortening it (tests/test_guide.py tests the screen)
GRACE_S = 3


def _finished(storage: str):
    names = optuna.get_all_study_names(storage) if _exists(storage) else []
    if not names:
        return []
    study = optuna.load_study(study_name=names[0], storage=storage)
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and counts_toward_budget(t)]


def _exists(storage: str) -> bool:
    return os.path.exists(storage.removeprefix("sqlite:///"))


def test_sigkill_mid_study_then_resume(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    cmd = CMD + ["--storage", storage, "--store", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(_finished(storage)) >= 3:
                break
        except Exception:  # the DB may be mid-creation
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    name = optuna.get_all_study_names(storage)[0]
    before = {t.number: (t.state, t.value) for t in optuna.load_study(study_name=name, storage=storage).trials
              if t.state.is_finished()}
    assert len([n for n in before]) >= 4  # the baseline and >= 3 search trials
    killed = [t.number for t in optuna.load_study(study_name=name, storage=storage).trials
              if t.state == optuna.trial.TrialState.RUNNING]

    time.sleep(GRACE_S + 0.5)  # the killed run's last heartbeat is now older than the grace period
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = optuna.load_study(study_name=name, storage=storage)
    after = {t.number: t for t in study.trials}
    for number, (state, value) in before.items():  # no completed trial lost or changed
        assert after[number].state == state and after[number].value == value
    search = [t for t in study.trials if counts_toward_budget(t)]
    assert len(search) == 14  # the budget counts distinct schedules across the two runs ...
    assert max(after) >= max(before) + 1  # ... and numbering continued
    for number in killed:  # the trial the kill interrupted: failed as stale, said so
        assert after[number].state == optuna.trial.TrialState.FAIL and result_of(after[number]).message == STALE
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    assert "stored" in rerun.stdout


def test_ctrl_c_stops_cleanly_and_keeps_the_best_so_far(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    cmd = [c if c != "14" else "200" for c in CMD] + ["--storage", storage, "--store", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(_finished(storage)) >= 2:
                break
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stored" in out and list((tmp_path / "schedules").glob("*/*.json"))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    assert len(study.trials) < 100  # it stopped long before the budget
