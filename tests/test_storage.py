"""Storage that does not crash: several processes opening a new SQLite file at once, a second
tuner on a live study, a journal whose last line a kill cut short."""
import os
import re
import subprocess
import sys
import time

import optuna
import pytest

from dynaflow.tuner.storage import open_storage
from dynaflow.tuner.study import counts_toward_budget, result_of

OPEN = "import sys; from dynaflow.tuner.storage import open_storage; open_storage(sys.argv[1]); print('ok')"


def test_processes_opening_a_new_sqlite_file_at_once_never_crash(tmp_path):
    """Optuna's schema creation races (`UNIQUE constraint failed: alembic_version`, `table ...
    already exists`) when two processes create it at once; the loser retries. Without the retry,
    about 3 rounds in 4 failed on this machine (4 rounds all passing without it: 1 in 256)."""
    for round_ in range(4):
        url = f"sqlite:///{tmp_path}/r{round_}.db"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and out.strip() == "ok", err[-1500:]


def test_a_journal_cut_mid_line_loads_without_that_line(tmp_path):
    path = tmp_path / "s.journal"
    study = optuna.create_study(storage=open_storage(f"journal:{path}"), study_name="s")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    with open(path, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "tri')  # what a kill mid-write leaves
    with pytest.warns(UserWarning, match=f"journal {path}: dropped its last line"):
        storage = open_storage(f"journal:{path}")
    study = optuna.load_study(study_name="s", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=2.0))  # appending after the cut works too
    again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{path}"))
    assert [t.value for t in again.trials] == [1.0, 2.0]


def a_silent_trial_is_failed_and_a_live_one_is_not(url: str) -> None:
    """Three trials asked on `url`'s storage (heartbeat 1 s, grace 2 s): one keeps beating, one stops,
    one never beat; after the grace, fail_stale_trials fails the two silent ones, saying why.
    tests/test_postgres.py runs it on a PostgreSQL server."""
    from dynaflow.tuner.storage import Heartbeat, StorageConfig, fail_stale_trials

    storage = open_storage(StorageConfig(url=url, heartbeat_s=1, grace_s=2))
    study = optuna.create_study(storage=storage, study_name="s")
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # ours beats, not Study.optimize
        live, dead, never = study.ask(), study.ask(), study.ask()  # never: killed before its first beat
    beat = Heartbeat(study)
    beat.add(live)
    beat.add(dead)
    beat.discard(dead)  # its process "died": no more heartbeats
    time.sleep(3.5)
    fail_stale_trials(study)
    beat.close()
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {live.number: optuna.trial.TrialState.RUNNING, dead.number: optuna.trial.TrialState.FAIL,
                      never.number: optuna.trial.TrialState.FAIL}
    assert "heartbeats" in result_of(study.get_trials(deepcopy=False)[dead.number]).message


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trial_whose_process_stops_beating_is_failed_and_a_live_one_is_not(tmp_path, kind):
    a_silent_trial_is_failed_and_a_live_one_is_not(f"sqlite:///{tmp_path}/s.db" if kind == "sqlite"
                                                    else f"journal:{tmp_path}/s.journal")


def test_two_tuners_on_one_study_share_its_budget_and_leave_each_other_alone(tmp_path):
    """Both finish; together they measure exactly the budget; neither fails the other's trials."""
    storage = f"sqlite:///{tmp_path}/s.db"
    cmd = [sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "llama-tiny", "--workload", "d8x32+p16",
           "--trials", "12", "--repeats", "3", "--warmup", "1", "--no-prune", "--no-progress", "--confirm-rounds", "1",
           "--heartbeat-s", "1", "--no-model", "--storage", storage, "--store", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not os.path.exists(f"{tmp_path}/s.db") and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = []
    for p in (first, second):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(out)
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    counted = [t for t in study.trials if counts_toward_budget(t)]
    assert len(counted) == 12  # the budget held across the two processes
    # each distinct schedule measured once: one still running elsewhere counts as known too
    keys = [result_of(t).schedule_obj().key() for t in counted]
    assert len(set(keys)) == 12, sorted(keys)
    seeds = {re.search(r"sampler seed (\d+)", out).group(1) for out in outs}
    assert len(seeds) == 2  # the two tuners draw different proposals
    for out in outs:  # both say the same, true count
        assert "12 distinct schedule(s) measured in the study" in out, out
    assert not [t for t in study.trials if "heartbeats" in result_of(t).message]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
