"""A real Ray cluster: a head and a joined node, each a Ray node of its own (its own raylet and
resources; `ray.cluster_utils.Cluster`, the processes `ray start` would run), on free ports. The
tuner joins it by address as a user would (`dynaflow-tune tune --workers N --ray-address ADDR`,
another process) with a model module that only the driver's working directory holds: the module
travels with the job (Ray's runtime_env py_modules), trials are measured on both nodes (each
worker named with its node), one study for the one hardware type, the driver the only writer."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import optuna
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

MODEL = '''
import torch
from torch import nn

from dynaflow.runtime import BatchLayout, Case, Workload


def make_case(w: Workload) -> Case:
    """A two-layer MLP on rows: any split of the rows is valid."""
    torch.manual_seed(w.seed)
    rows = w.num_decode or 8
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    return Case(model=model, inputs=(torch.randn(rows, 32),), layout=BatchLayout.uniform(rows, 1), name="cluster_mlp")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Head and one joined node, one CPU each; every process they started ended by pid at the end."""
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "gcs_server_port": free_port(), "include_dashboard": False})
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
