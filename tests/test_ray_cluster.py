"""A real Ray cluster: a head and a joined node, each a Ray node of its own (its own raylet and
resources; `ray.cluster_utils.Cluster`, the processes `ray start` would run), on free ports. The
tuner joins it by address as a user would (`dynaflow-tune tune --workers N --ray-address ADDR`,
another process) with a model module that only the driver's working directory holds: the module
travels with the job (Ray's runtime_env py_modules), trials are measured on both nodes (each
worker named with its node), one study for the one hardware type, the driver the only writer."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

import optuna
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster_models import MODEL, PACED  # noqa: E402

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scratch():
    """The cluster's temporary folder (TMPDIR of its nodes' processes, and so of the workers and
    rank groups they start): what a test counts there is its own, whatever runs beside it."""
    folder = tempfile.mkdtemp(prefix="dft-ray-")  # short: Ray's socket paths live under it
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(scratch):
    """Head and one joined node, one CPU each; every process they started ended by pid at the end."""
    os.environ.pop("RAY_ADDRESS", None)
    # a lost node is found in about 5 s instead of Ray's default ~20 s (health checks every 3 s after 5 s, 5 missed)
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    with mock.patch.dict(os.environ, {"TMPDIR": scratch}):  # the nodes' processes inherit it
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "gcs_server_port": free_port(),
                                                          "include_dashboard": False, "_system_config": health})
        worker = c.add_node(num_cpus=1)
        c.wait_for_nodes()
    pids = [p.process.pid for node in (c.head_node, worker) for ps in node.all_processes.values() for p in ps]
    yield c
    c.shutdown()
    for pid in pids:  # ended, not left behind
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        os.kill(pid, 9)


@pytest.mark.slow
def test_a_tune_joins_the_cluster_and_measures_on_both_nodes(cluster, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "cluster_model.py").write_text(MODEL)  # importable from the driver's folder only
    storage = f"sqlite:///{tmp_path}/s.db"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    run = subprocess.run([sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "cluster_model:make_case",
                          "--workload", "d8x16", "--workers", "2", "--ray-address", cluster.address, "--trials", "8",
                          "--confirm-rounds", "1", "--store", str(tmp_path / "store"), "--storage", storage,
                          "--no-progress"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Traceback" not in out, out[-4000:]
    nodes = {n.node_id[:6] for n in cluster.list_all_nodes()}
    assert len(nodes) == 2
    where = re.search(r"ray pool: (node \w+: w\d(?:, w\d)*; node \w+: w\d(?:, w\d)*)", out)
    assert where, out[-3000:]
    # the study (one: one hardware type) holds trials measured on each node, named with it
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=storage)
    workers = {t.user_attrs["result"]["worker"] for t in study.trials
               if "result" in t.user_attrs and t.user_attrs["result"].get("worker") not in (None, "driver")}
    on = {w.split("@")[1] for w in workers if "@" in w}
    assert on == nodes, (workers, nodes)
    # the per-worker summary names each worker with its node, and the driver's time per trial
    summary = next(line for line in out.splitlines() if "trial(s) by worker" in line)
    assert all(f"@{n}: ok" in summary for n in nodes) and re.search(r"driver \d+ ms per trial", summary), summary
    assert "Connecting to existing Ray cluster" not in out  # Ray's INFO lines stay out of the tool's output


def _search_trials(storage: str) -> list:
    names = optuna.get_all_study_names(storage)
    if not names:
        return []
    return [t for t in optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False)
            if not t.user_attrs.get("baseline")]


@pytest.mark.slow
def test_a_node_lost_mid_tune_costs_only_its_trials_and_a_joining_node_is_used(cluster, tmp_path):
    """A node's raylet killed mid-tune: its in-flight trial is crashed (killed worker) and never
    measured again, the other nodes carry on, the study and the store lose nothing; the lost
    worker's replacement waits for room and runs on a node that joins later."""
    lost = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    lost_id = lost.node_id[:6]
    work = tmp_path / "project"
    work.mkdir()
    (work / "paced_model.py").write_text(PACED)
    storage = f"sqlite:///{tmp_path}/s.db"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    tune = subprocess.Popen([sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "paced_model:make_case",
                             "--workload", "d8x16", "--workers", "3", "--ray-address", cluster.address, "--trials", "70",
                             "--confirm-rounds", "1", "--store", str(tmp_path / "store"), "--storage", storage,
                             "--no-progress"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    joined = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and tune.poll() is None:  # until the node has measured a trial
            if any(f"@{lost_id}" in (t.user_attrs.get("result") or {}).get("worker", "") for t in _search_trials(storage)):
                break
            time.sleep(0.5)
        assert tune.poll() is None, tune.communicate()[0][-3000:]
        cluster.remove_node(lost, allow_graceful=False)  # its raylet killed: the node is gone
        joined = cluster.add_node(num_cpus=1)  # and another joins
        out, _ = tune.communicate(timeout=540)
    finally:
        if tune.poll() is None:
            tune.kill()
            tune.communicate()
    assert tune.returncode == 0 and "Traceback" not in out, out[-4000:]
    trials = _search_trials(storage)
    results = [t.user_attrs.get("result") or {} for t in trials]
    measured = [r for r in results if r.get("worker")]  # the rest the driver answered (duplicates, the budget)
    died = [r for r in measured if r.get("outcome") == "crashed"]
    assert died and all(r["killed_worker"] and f"@{lost_id}" in r["worker"] for r in died), (died, out[-3000:])
    assert {r.get("outcome") for r in measured} <= {"ok", "pruned", "crashed"}, {r.get("outcome") for r in measured}
    for r in died:  # never measured again: proposed again, it is answered by the driver, not run
        assert sum(1 for x in measured if x.get("schedule") == r["schedule"]) == 1
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    workers = {r.get("worker") or "" for r in results}
    assert any(w.endswith(f"@{joined.node_id[:6]}") for w in workers), (workers, joined.node_id[:6])  # the joined node worked
    assert len(list((tmp_path / "store" / "schedules").rglob("*.json"))) == 1  # stored
    assert "[state-dump]" not in out and "(raylet)" not in out, out[-3000:]  # Ray's raylet log dump left out
    assert "ray: the cluster reported a raylet lost" in out, out[-3000:]


@pytest.mark.slow
def test_a_lost_head_ends_the_tune_in_seconds_with_one_line_saying_what_is_kept(tmp_path):
    """The head killed mid-search (a cluster of its own: the module's must live on): within
    LOST_S the tune ends, exit 1, with one line of the tool's (the cluster lost, how many
    schedules the study keeps, run the same command again), not Ray's 60 s of retries and its C++
    line; nothing left running in the study."""
    from dynaflow.tuner.ray_fanout import LOST_S

    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "gcs_server_port": free_port(),
                                                      "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        storage = f"sqlite:///{tmp_path}/s.db"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        tune = subprocess.Popen([sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "llama-tiny",
                                 "--workload", "d8x32", "--workers", "1", "--ray-address", c.address, "--trials", "200",
                                 "--no-model", "--confirm-rounds", "1", "--store", str(tmp_path / "store"), "--storage",
                                 storage, "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and tune.poll() is None and len(_search_trials(storage)) < 3:
                time.sleep(0.5)
            assert tune.poll() is None, tune.communicate()[0][-3000:]
            c.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
            killed = time.monotonic()
            out, _ = tune.communicate(timeout=120)
            took = time.monotonic() - killed
        finally:
            if tune.poll() is None:
                tune.kill()
                tune.communicate()
    finally:
        c.shutdown()
    assert tune.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert took < LOST_S + 20, (took, out[-3000:])  # Ray alone: 60 s of retries, then its C++ line
    [line] = [x for x in out.splitlines() if x.startswith("dynaflow-tune tune:")]
    assert "the Ray cluster was lost: its head" in line and "run the same command again to resume" in line, line
    assert re.search(r"The study keeps every trial measured \(\S+: [1-9]\d* schedule\(s\) measured\)", line), line
    assert not [t for t in _search_trials(storage) if t.state == optuna.trial.TrialState.RUNNING]
    assert "GCS may have been killed" not in out and "[state-dump]" not in out, out[-3000:]


@pytest.mark.slow
def test_tensor_parallel_groups_are_placed_one_per_node_and_a_node_too_small_is_counted_out(cluster, scratch, tmp_path):
    """`--tp 2 --workers K`: each worker is a group of 2 rank processes (gloo) on one node, its CPU
    slots reserved there by a placement group; two nodes of 2 CPUs hold one group each, the
    1-CPU nodes none. Asking for more groups than the nodes hold is refused with each node's
    numbers before any trial; `all` runs one group per big node, trials measured on both."""
    import glob

    folders = set(glob.glob(os.path.join(scratch, "dynaflow-tp-*")))  # the groups' rendezvous, in the nodes' TMPDIR
    with mock.patch.dict(os.environ, {"TMPDIR": scratch}):
        big = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
    ids = {n.node_id[:6] for n in big}
    storage = f"sqlite:///{tmp_path}/s.db"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "dynaflow.tuner.cli", "tune", "--model", "llama-tiny", "--tp", "2", "--workload",
            "d4x16", "--ray-address", cluster.address, "--trials", "6", "--confirm-rounds", "1", "--store",
            str(tmp_path / "store"), "--storage", storage, "--no-progress"]
    refused = subprocess.run([*argv, "--workers", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = [x for x in refused.stderr.splitlines() if x.startswith("dynaflow-tune tune: error:")]
    assert len(line) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "--workers 3 with --tp 2 needs 3 group(s) of 2 CPUs, each group on one node, but the Ray cluster's " \
           "nodes hold 2 (" in line[0] and "ask for at most 2." in line[0], line
    assert all(f"node {n}: 2 CPU(s), 1 group(s)" in line[0] for n in ids) and "1 CPU(s), 0 group(s)" in line[0], line
    assert optuna.get_all_study_names(storage) == []  # refused before any study or trial
    run = subprocess.run([*argv, "--workers", "all"], env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Traceback" not in out, out[-4000:]
    assert "ray pool: 2 worker(s)" in out, out[-3000:]
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1 and names[0].endswith("_tp2/nanoflow"), names
    workers = {r["worker"] for t in _search_trials(storage) if (r := t.user_attrs.get("result") or {}).get("worker")}
    assert {w.split("@")[1] for w in workers if "@" in w} == ids, (workers, ids)  # a group on each big node
    assert len(list((tmp_path / "store" / "schedules").rglob("*_tp2.json"))) == 1
    # every group stopped by its worker before the worker was killed: no rendezvous folder left behind
    assert set(glob.glob(os.path.join(scratch, "dynaflow-tp-*"))) == folders
