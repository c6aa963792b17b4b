"""The PostgreSQL storage the README offers (`--storage postgresql://user@host/db`, how tuners on
several machines share a study without Ray), against a real server this module starts: Debian's
`postgresql` package (scripts/test.sh installs it where apt-get can; DYNAFLOW_EXPECT_POSTGRES=1
there, so a missing server fails instead of skipping), a throw-away cluster (`initdb`, `pg_ctl`)
on a free port, trust authentication on 127.0.0.1, stopped at the end. The driver is the one
SQLAlchemy uses for `postgresql://` (psycopg 3 from SQLAlchemy 2.1; the dev extra and the
`postgres` extra install psycopg[binary])."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from dynaflow.tuner.study import counts_toward_budget, result_of
from test_storage import a_silent_trial_is_failed_and_a_live_one_is_not


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (found[-1] if found else None)


def _skip_or_fail(why: str):
    if os.environ.get("DYNAFLOW_EXPECT_POSTGRES") == "1":
        pytest.fail(f"{why} (scripts/test.sh installed PostgreSQL for this run)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL cluster of its own: its URL, and the cluster stopped at the end."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (the dev extra installs psycopg[binary])")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not (initdb and pg_ctl):
        _skip_or_fail("no PostgreSQL server here (Debian's postgresql package; scripts/test.sh installs it as root)")
    root = Path(tempfile.mkdtemp(prefix="dft-pg-"))  # short: the server's socket path must fit 107 bytes
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the package's postgres user runs the server
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            _skip_or_fail("running as root, and there is no postgres user to run the server as")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    run = lambda *argv: subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    assert made.returncode == 0, made.stdout + made.stderr
    started = run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                  f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300", "start")
    assert started.returncode == 0, started.stdout + started.stderr + (root / "log").read_text()
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def url(server):
    """The server's database, emptied of the studies a previous test made."""
    yield server
    for name in optuna.get_all_study_names(server):
        optuna.delete_study(study_name=name, storage=server)


def test_a_trial_whose_process_stops_beating_is_failed_on_postgresql(url):
    a_silent_trial_is_failed_and_a_live_one_is_not(url)


def _running(storage) -> bool:
    names = optuna.get_all_study_names(storage)
    return bool(names) and any(t.state == optuna.trial.TrialState.RUNNING and not t.user_attrs.get("baseline")
                               for t in optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False))


@pytest.mark.slow
def test_two_tuners_share_a_study_on_postgresql_and_one_killed_mid_trial_loses_nothing(url, tmp_path):
    """Two tuner processes on one study in PostgreSQL; the first is killed (SIGKILL) while it
    measures a trial. The second fails that trial by its silent heartbeat, goes on to the budget,
    and stores the verdict: every trial that counts is a distinct schedule, none is left running."""
    cmd = [sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "llama-tiny", "--workload", "d8x32+p16",
           "--trials", "12", "--repeats", "3", "--warmup", "1", "--no-prune", "--no-progress", "--confirm-rounds", "1",
           "--heartbeat-s", "1", "--no-model", "--storage", url, "--store", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = None
    polled = optuna.storages.RDBStorage(url)  # one connection pool for the polling, not one per look
    try:
        deadline = time.monotonic() + 120
        while not _running(polled) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not _running(polled) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[0][-3000:]
        first.send_signal(signal.SIGKILL)  # mid-trial: its running trial stays RUNNING, silent
        first.communicate()
        out, _ = second.communicate(timeout=300)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0 and "Traceback" not in out, out[-3000:]
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]  # the killed one was failed
    counted = [t for t in trials if counts_toward_budget(t)]
    assert len(counted) == 12  # the budget held across the two processes (the killed trial spent its share)
    measured = [t for t in counted if result_of(t).schedule_obj() is not None]
    lost = [t for t in counted if result_of(t).schedule_obj() is None]  # the killed process's trial in flight
    assert all("heartbeats" in result_of(t).message for t in lost), [result_of(t).message for t in lost]
    keys = [result_of(t).schedule_obj().key() for t in measured]
    assert len(set(keys)) == len(keys) == 12 - len(lost), sorted(keys)  # nothing measured twice
    assert f"{len(keys)} distinct schedule(s) measured" in out, out[-3000:]
    assert len(list((tmp_path / "schedules").rglob("*.json"))) == 1 and "stored " in out  # the verdict stored


def test_a_missing_driver_is_one_line_naming_the_package(monkeypatch, capsys):
    from dynaflow.tuner.cli import main

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where it is not installed
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    for url, package in (("postgresql://user@127.0.0.1:1/db", "psycopg[binary]"),
                         ("postgresql+psycopg2://user@127.0.0.1:1/db", "psycopg2-binary")):
        assert main(["studies", "--storage", url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs a database driver" in err[0] and f"pip install '{package}'" in err[0], err
