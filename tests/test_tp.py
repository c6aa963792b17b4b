"""Tensor parallelism on CPU with 2 gloo ranks: collectives are ops, every schedule of a TP layer
equals its sequential run and the unsharded layer, and a rank that dies or hangs fails one trial."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import FixedTrial

from dynaflow.runtime import MeasureConfig, Schedule, TrialOutcome, Workload
from dynaflow.runtime.graph import Resource
from dynaflow.runtime.store import ScheduleStore, StoreConfig
from dynaflow.search_spaces import get_space
from dynaflow.tuner import tp as tp_module
from dynaflow.tuner.cli import main
from dynaflow.tuner.tp import TPTarget
from fakes import tiny_context

TESTS = Path(__file__).parent
BATCH = dict(num_decode=8, context_len=12, prefill_tokens=16, prefill_chunk=4)


SEQUENCE_PARALLEL = ["attn_reduce_scatter", "mlp_all_gather", "mlp_reduce_scatter", "out_all_gather"]


def test_random_schedules_of_tp2_layers_equal_their_sequential_run_and_the_unsharded_layer(tmp_path):
    """60 random split schedules (nanoflow, dbo) of llama-tiny and mixtral-tiny at TP-2, with
    all-reduces and sequence-parallel (reduce-scatter, all-gather), each run on 2 gloo ranks: every
    output within the derived tolerance of the sequential TP run and of the unsharded layer (same
    seed); collectives are network ops, some on a stream of their own. 23 tokens: the sequence-
    parallel rows are padded to a multiple of 2, as are a split's odd nano-batches. The serving path
    (ScheduledModule on each rank) runs five of them too."""
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(TESTS / "tp_ranks.py"), str(r), "2", str(tmp_path / "rv"),
                               str(out), "15", "llama-tiny,mixtral-tiny,llama-tiny+sp,mixtral-tiny+sp"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    report = json.loads(out.read_text())
    assert sorted(report) == ["llama-tiny", "llama-tiny+sp", "mixtral-tiny", "mixtral-tiny+sp"]
    total = 0
    for model, r in report.items():
        network = [name for name, resource, nbytes in r["ops"] if resource == "network"]
        sp = model.endswith("+sp")
        assert network == (SEQUENCE_PARALLEL if sp else ["attn_allreduce", "mlp_allreduce"]), (model, r["ops"])
        # bytes each rank moves: an all-reduce 2(n-1)/n = 1 of its 23 x 64 float32 tensor; a reduce-scatter
        # or all-gather (n-1)/n = 1/2 of the whole (padded to 24 rows)
        assert {nbytes for name, _, nbytes in r["ops"] if name in network} == {24 * 64 * 4 / 2 if sp else 23 * 64 * 4}
        assert r["sequential_vs_unsharded"] <= 1
        assert len(r["served"]) == 5 and max(r["served"]) <= 1  # ScheduledModule on a rank: each nano-batch's group
        for s in r["schedules"]:
            assert s["nano"] > 1
            assert s["vs_sequential"] <= 1 and s["vs_unsharded"] <= 1, (model, s)
        own = [s for s in r["schedules"] if s["network_streams"] and "+network" in s["label"]]
        assert own, "no schedule put the collectives on a stream of their own"
        total += len(r["schedules"])
    assert total >= 50


def test_a_tp_workload_is_checked_and_keyed_by_its_degree():
    w = Workload(model="llama-tiny", **BATCH, tp=2)
    assert w.key.endswith("_fp32_tp2") and Workload(model="llama-tiny", **BATCH).key.endswith("_fp32")
    assert Workload.from_dict({"model": "llama-tiny", "num_decode": 1, "context_len": 4, "tp": 2}).tp == 2
    with pytest.raises(ValueError, match=r"tp=3 must divide .* num_heads=4, num_kv_heads=2, intermediate=128 "
                                         r"is not a multiple of 3"):
        Workload(model="llama-tiny", **BATCH, tp=3)
    with pytest.raises(ValueError, match=r"tp must be an int >= 1 .* but got 0"):
        Workload(model="llama-tiny", **BATCH, tp=0)
    with pytest.raises(ValueError, match=r"tp=2 shards the built-in presets .* but model is 'hf:llama'"):
        Workload(model="hf:llama", **BATCH, tp=2)
    with pytest.raises(ValueError, match=r"workload tp=2 runs on 2 ranks, one process each, but this process has "
                                         r"no torch.distributed group; `dynaflow-tune \.\.\. --tp 2` starts them"):
        w.build()


def test_the_nanoflow_space_gives_collectives_a_stream_of_their_own_only_when_asked():
    ctx = tiny_context()
    ops = list(ctx.graph.ops)
    i = ctx.graph.names.index("o_proj")
    ops[i] = type(ops[i])(name="o_proj", deps=ops[i].deps, resource=Resource.NETWORK)  # stands in for a collective
    ctx = type(ctx)(hardware=ctx.hardware, graph=type(ctx.graph)(ops=tuple(ops), module=None, writes_output=True),
                    layout=ctx.layout)
    base = dict(num_nano=2, weight_0=1, weight_1=1, streams="one", stagger=1, partition=False, prioritise_memory=False,
                cuda_graph=False)
    shared = get_space("nanoflow")(FixedTrial({**base, "network_stream": False}), ctx)
    own = get_space("nanoflow")(FixedTrial({**base, "network_stream": True}), ctx)
    assert shared.label == "sequential" or len(shared.streams) == 1
    assert len(own.streams) == 2 and own.label.startswith("nanoflow:2x:one+network")
    assert {s.stream for s in own.order if s.op == "o_proj"} == {1}
    assert {s.stream for s in own.order if s.op != "o_proj"} == {0}
    # partitioned: the compute and memory streams get SM shares, the network stream none (NCCL's own stream runs it)
    parted = get_space("nanoflow")(FixedTrial({**base, "streams": "compute|rest", "network_stream": True,
                                              "partition": True, "sm_steps_0": 12, "sm_steps_1": 4}), ctx)
    assert [x.sm_share for x in parted.streams] == [96, 32, None]
    assert {s.stream for s in parted.order if s.op == "o_proj"} == {2}
    # a graph without collectives never asks
    asked = FixedTrial(base)
    get_space("nanoflow")(asked, tiny_context())
    assert "network_stream" not in asked.params and "stagger" in asked.params


@pytest.fixture
def quick_group(monkeypatch):
    monkeypatch.setattr(tp_module, "GRACE_S", 1.0)
    target = TPTarget(Workload(model="llama-tiny", **BATCH, tp=2),
                      MeasureConfig(warmup=0, repeats=2, collective_timeout_s=3.0))
    yield target
    target.close()


def _split(target) -> Schedule:
    return get_space("dbo")(FixedTrial({"offset_steps": 0, "template": "by-resource"}), target.space_context())


def test_a_killed_rank_and_a_hung_collective_each_fail_one_trial_and_the_group_is_replaced(quick_group):
    """Rank 1 killed (SIGKILL): the trial is CRASHED naming it, and the next trial runs on a fresh
    group. Rank 1 stopped (SIGSTOP): rank 0's collective never completes and times out, rank 1 never
    answers, the trial ends within the collective timeout and the grace (not the trial's limit), and
    the stopped rank is killed with its group."""
    target = quick_group
    assert target.measure(_split(target)).ok
    os.kill(target.ranks[1].pid, signal.SIGKILL)
    m = target.measure(_split(target), time_limit_s=120)
    assert m.outcome is TrialOutcome.CRASHED and m.killed_worker
    assert m.message.startswith("rank 1 died (exit code -9)"), m.message
    assert not target.ranks  # replaced before the next trial
    again = target.measure(_split(target))  # on a fresh group
    assert again.ok, again.message
    assert len(target.ranks) == 2

    stopped = target.ranks[1].pid
    os.kill(stopped, signal.SIGSTOP)  # rank 1 never issues its next collective
    t0 = time.monotonic()
    m = target.measure(_split(target), time_limit_s=120)
    assert m.outcome is TrialOutcome.TIMEOUT and m.killed_worker, m
    assert "rank(s) [1] did not answer the trial in time (a hung collective?)" in m.message, m.message
    assert time.monotonic() - t0 < 30  # the collective timeout (3 s) and the grace, not the trial's 120 s
    assert not target.ranks
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)  # the stopped rank was killed with its group


def test_tune_tp2_stores_a_verdict_and_ops_prints_the_collectives(tmp_path, capsys):
    args = ["--model", "llama-tiny", "--tp", "2", "--store", str(tmp_path)]
    assert main(["measure", *args, "--device", "cuda", "--workload", "d8x12"]) == 2  # a rank's error, in one line
    err = capsys.readouterr().err
    assert "--tp 2 needs 2 CUDA devices (one per rank), but torch sees 0." in err and "Traceback" not in err
    assert main(["ops", *args, "--workload", "d8x12+p16c4"]) == 0
    out = capsys.readouterr().out
    assert "llama-tiny_d8x12_p16_c4_fp32_tp2 on cpu-" in out
    assert "all-reduce bus bandwidth" in out and "over 2 ranks" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}
    assert rows["attn_allreduce"] == rows["mlp_allreduce"] == "network"
    assert main(["tune", *args, "--workload", "d8x12+p16c4", "--space", "nanoflow", "--trials", "4", "--repeats", "3",
                 "--confirm-rounds", "1", "--storage", f"sqlite:///{tmp_path}/s.db", "--no-progress"]) == 0
    out = capsys.readouterr().out
    [path] = (tmp_path / "schedules").glob("*/*.json")
    assert path.stem == "llama-tiny_d8x12_p16_c4_fp32_tp2" and str(path) in out
    record = ScheduleStore(StoreConfig(root=tmp_path)).read(path)
    assert record.workload.tp == 2 and record.verdict in ("winner", "sequential_best", "inconclusive")
    assert "4 distinct schedule(s) measured" in out
    assert main(["report", "--storage", f"sqlite:///{tmp_path}/s.db", "--store", str(tmp_path),
                 "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "runs on 2 ranks: the report does not start a TP group for timelines" in report


def test_a_tp_ranks_map_loads_the_records_of_its_degree_only(tmp_path, caplog):
    """A shard's ops are not the whole layer's: a server at tp=2 gets the tp=2 records, and a map
    that finds none says which parallelism the store holds."""
    import logging

    from dynaflow.runtime import ScheduleMap, detect
    from test_shapes import save

    cpu = detect("cpu")
    batch = dict(model="llama-tiny", num_decode=8, context_len=16, device="cpu", dtype="float32")
    save(tmp_path, Workload(**batch), (4, 4), hardware=cpu)
    save(tmp_path, Workload(**batch, tp=2), (2, 6), hardware=cpu)
    pick = dict(num_decode=8, num_prefill=0, chunk=0, context_len=16)
    assert ScheduleMap.load(tmp_path, model="llama-tiny", dtype="float32").pick_counts(**pick).split_sizes == (4, 4)
    assert ScheduleMap.load(tmp_path, model="llama-tiny", dtype="float32", tp=2).pick_counts(**pick).split_sizes == (2, 6)
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        empty = ScheduleMap.load(tmp_path, model="llama-tiny", dtype="float32", tp=4)
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "no records for llama-tiny float32 at tp=4 (only for llama-tiny float32, llama-tiny float32 at tp=2)" in said
    assert empty.pick_counts(**pick).is_sequential
