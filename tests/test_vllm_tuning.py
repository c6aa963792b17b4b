"""Tuning on vLLM's own model, the parts that need no vLLM: the Case hooks a kept vLLM step is run
through (each task inside its nano-batch's context; a sequential schedule timed as the call
serving makes), other libraries' ops counted like aten's, `vllm:` models known by their folder's
name, and every way `dynaflow-tune` refuses a vLLM model it cannot tune, in one line. The whole
loop inside vLLM is tests/test_vllm.py (run where vLLM is installed)."""
import dataclasses
import importlib.util
import threading

import pytest
import torch

from dynaflow.runtime import Bench, Schedule, ScheduleMap, StreamSpec, Workload
from dynaflow.runtime.counters import FOREIGN_OPS, count, register_op
from dynaflow.runtime.executor import Executor
from dynaflow.runtime.measure import MeasureConfig, TrialOutcome
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.runtime.workload import model_name
from fakes import H100
from test_hostile_input import one_line, run_cli

TINY = Workload(model="llama-tiny", num_decode=4, context_len=16, prefill_tokens=8, prefill_chunk=4)
SCHEDULES = [Schedule(), Schedule(split_sizes=(2, 4)), Schedule(split_sizes=(1, 3, 2), streams=(StreamSpec(), StreamSpec()))]


class Entered:
    """A Case.around recording which (op, nano-batch index, request range) each task ran inside."""

    def __init__(self, ops=None) -> None:
        self.ops, self.seen, self.lock = ops, [], threading.Lock()

    def __call__(self, op: str, nano: int, r0: int, r1: int):
        if self.ops is not None and op not in self.ops:
            return None
        import contextlib

        @contextlib.contextmanager
        def inside():
            with self.lock:
                self.seen.append((op, nano, r0, r1))
            yield
        return inside


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.label)
def test_every_task_runs_inside_its_nano_batchs_context(schedule):
    case = TINY.build()
    ref = Executor(case).reference().clone()
    entered = Entered()
    ex = Executor(dataclasses.replace(case, around=entered))
    run = ex.compile(schedule)
    out = run()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ranges = run.plan.ranges
    want = sorted((op, b, *r) for op in ex.graph.names for b, r in enumerate(ranges))
    assert sorted(entered.seen) == want  # every (op, nano-batch) once, inside its own index's and range's context
    entered.seen.clear()
    run()
    assert sorted(entered.seen) == want
    run.close()


def test_around_may_leave_ops_bare():
    case = TINY.build()
    names = Executor(case).graph.names
    entered = Entered(ops={names[1]})
    run = Executor(dataclasses.replace(case, around=entered)).compile(Schedule(split_sizes=(2, 4)))
    run()
    assert entered.seen == [(names[1], 0, 0, 2), (names[1], 1, 2, 6)]
    run.close()


def test_a_sequential_schedule_is_timed_as_the_call_serving_makes():
    case = TINY.build()
    calls = []

    def own(*inputs):
        calls.append(len(inputs))
        return case.model(*inputs) * 1  # a fresh tensor, like a compiled graph's

    bench = Bench(case=dataclasses.replace(case, sequential=own), config=MeasureConfig(warmup=1, repeats=3))
    before = len(calls)
    m = bench.measure(Schedule())
    assert m.ok and len(calls) - before == 1 + 1 + 3 + 0  # checked, warmed up, timed (the last check reads .out)
    assert "serving makes it" in m.notes["sequential"]
    n = len(calls)
    split = bench.measure(Schedule(split_sizes=(2, 4)))
    assert split.ok and len(calls) == n and "sequential" not in split.notes  # a split runs the op plan


def test_a_sequential_call_that_differs_from_the_reference_is_incorrect():
    case = TINY.build()
    bench = Bench(case=dataclasses.replace(case, sequential=lambda *inputs: case.model(*inputs) + 1.0),
                  config=MeasureConfig(warmup=0, repeats=1))
    assert bench.measure(Schedule()).outcome is TrialOutcome.INCORRECT


@pytest.fixture
def handle_mm():
    """A custom op like vLLM's oneDNN GEMM: out [M, N] = x [M, K] @ a weight the op's handle holds."""
    lib = torch.library.Library("dynaflow_test", "FRAGMENT")
    lib.define("handle_mm(Tensor(a!) out, Tensor x, Tensor handle) -> ()")
    weight = torch.randn(32, 24)

    def impl(out, x, handle):
        torch.mm(x, weight, out=out)
    lib.impl("handle_mm", impl, "CompositeExplicitAutograd")
    op = torch.ops.dynaflow_test.handle_mm
    yield op, weight
    FOREIGN_OPS.pop(op, None)
    lib._destroy()


def test_a_registered_op_is_counted_like_a_matmul(handle_mm):
    op, weight = handle_mm
    x, handle = torch.randn(5, 32), torch.zeros(1)

    def run(x):
        out = torch.empty(5, 24)
        op(out, x, handle)
        return out
    _, before = count(run, x)
    assert before.flops == 0 and before.max_reduction == 1  # torch's counter cannot see inside it
    register_op(op.default, flops=lambda out, x, h, out_shape=None: 2 * out[0] * out[1] * x[1],
                reduction=lambda args: args[1].shape[-1], hidden_bytes=lambda args: 32 * 24 * 4)
    _, after = count(run, x)
    assert after.flops == 2 * 5 * 24 * 32 and after.max_reduction == 32
    assert after.bytes == before.bytes + weight.nbytes


def test_a_vllm_model_is_known_by_its_folders_name(tmp_path):
    for spelled in ("vllm:./models/llama", "vllm:/abs/models/llama/", "vllm:llama"):
        assert model_name(spelled) == "vllm:llama"
        assert Workload(model=spelled, num_decode=4, context_len=64).key == "vllm-llama_d4x64_p0_fp32"
    assert model_name("hf:llama") == "hf:llama" and model_name("tests.models:x") == "tests.models:x"
    w = Workload(model="vllm:/tuned/here/llama", num_decode=4, context_len=64, device="cpu", dtype="float32")
    ScheduleStore(StoreConfig(root=tmp_path)).save(StoredSchedule(
        hardware=H100, workload=w, schedule=Schedule(split_sizes=(2, 2)), verdict="winner", tokens_per_s=1.0,
        baseline_tokens_per_s=1.0, speedup=1.2, speedup_spread=0.01, efficiency=0.5, space="nanoflow"))
    smap = ScheduleMap.load(tmp_path, model="vllm:llama", dtype="float32", hardware=H100)  # as vLLM's plugin names it
    assert len(smap.records) == 1


def test_a_vllm_model_builds_only_inside_vllm():
    with pytest.raises(ValueError, match=r"runs inside vLLM's worker process"):
        Workload(model="vllm:/models/llama", num_decode=4, context_len=64).build()


def test_tune_names_a_folder_that_is_not_a_model(tmp_path):
    code, _, err = run_cli("tune", "--model", f"vllm:{tmp_path}", "--workload", "d4x64", "--store", tmp_path / "s",
                           "--storage", "sqlite:///:memory:")
    assert code == 2
    one_line(err, f"vllm:{tmp_path}", "is not a model folder (no config.json in it)")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_tune_without_vllm_says_how_to_install_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_cli("ops", "--model", f"vllm:{tmp_path}", "--workload", "d4x64", "--store", tmp_path / "s")
    assert code == 2
    one_line(err, "vLLM, which is not installed", "sh scripts/setup.sh --vllm")


def test_a_ray_pool_is_refused_for_vllm_models(tmp_path):
    code, _, err = run_cli("tune", "--model", f"vllm:{tmp_path}", "--workload", "d4x64", "--workers", "2",
                           "--store", tmp_path / "s", "--storage", "sqlite:///:memory:")
    assert code == 2 and "error: vllm: models are measured in the one vLLM engine" in err  # bad input
    one_line(err, "vllm: models are measured in the one vLLM engine", "--workers")


def test_a_ray_pool_whose_groups_do_not_fit_the_tp_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """The CLI sizes the pool's groups from --tp; an API caller's PoolConfig that does not is one
    error naming the workload and the group size it needs (tests/test_ray_cluster.py places them)."""
    from dynaflow.tuner.config import TuneConfig
    from dynaflow.tuner.ray_fanout import PoolConfig
    from dynaflow.tuner.tune import tune

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # never reached
    config = TuneConfig(workloads=(Workload(model="llama-tiny", num_decode=4, context_len=16, tp=2),),
                        storage=f"sqlite:///{tmp_path}/s.db", store_root=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"a Ray pool of 1-rank workers cannot run llama-tiny_d4x16_p0_fp32_tp2: "
                                         r"give the pool group_size=2\."):
        tune(config, pool=PoolConfig(workers=1))


def test_the_engine_is_started_once_with_room_for_every_workload(monkeypatch):
    from dynaflow.tuner import vllm_engine as replay

    started = []

    class Fake:
        def __init__(self, folder, dtype, limits):
            self.folder, self.dtype, self.limits = folder, dtype, limits
            started.append(limits)

        def close(self):
            pass

    monkeypatch.setattr(replay, "Engine", Fake)
    monkeypatch.setattr(replay, "_ENGINE", [])
    monkeypatch.setattr(replay, "_RESERVED", [])
    ws = [Workload(model="vllm:/m", num_decode=d, context_len=c, prefill_tokens=p, prefill_chunk=p or None)
          for d, c, p in ((4, 64, 0), (32, 512, 0), (2, 128, 300))]
    replay.reserve(ws)
    for w in ws:
        e = replay.engine_for("/m", "float32", replay.limits_for(w))
        assert e.limits.covers(replay.limits_for(w))
    assert len(started) == 1
    limits = started[0]
    assert limits.requests >= 32 and limits.model_len >= 512 and limits.tokens >= 302
    replay.engine_for("/other", "float32", replay.limits_for(ws[0]))  # another model: a new engine
    assert len(started) == 2
