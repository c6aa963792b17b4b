"""One protocol for measuring in another process (tuner/remote.py), held to one set of rules over
every target that measures elsewhere (a tensor-parallel group's ranks, vLLM's worker, a Ray
actor) and every pool (in this process, Ray's, the loop's fake):

- a measure that raises is one CRASHED trial carrying the error, and the next trial measures;
- a worker that dies is one CRASHED trial with `killed_worker`, one that hangs one TIMEOUT trial
  with `killed_worker`, ended within the trial's limit and the transport's grace, and the next
  trial measures on a fresh worker;
- every result reaches its own trial, each job is answered once.

The faults are injected where the trial runs (tests/remote_faults.py: a schedule's label makes
its measure raise, its process exit or hang); every other schedule is measured by the real
Bench and says which schedule it was. vLLM's worker is a fake here (vLLM is not installed in
the suite's environment) that keeps collective_rpc's rules: arguments and answers pickle, a
timeout raises TimeoutError, a dead worker an error; the rest of the transport (the Engine's
call, VllmTarget, the worker's Station) is the real code."""
from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import pytest

from dynaflow.runtime import MeasureConfig, Schedule, TrialOutcome, Workload
from dynaflow.tuner import tp as tp_module
from dynaflow.tuner import vllm_engine
from dynaflow.tuner.pool import InlinePool, Job
from dynaflow.tuner.remote import Explain, Measure, Prepare, Reply, Station
from dynaflow.tuner.targets import VllmTarget
from dynaflow.tuner.tp import TPTarget
import remote_faults
from remote_faults import Faulty, WorkerDied

TESTS = str(Path(__file__).parent)
W = Workload(model="llama-tiny", num_decode=4, context_len=16)
W_TP = Workload(model="llama-tiny", num_decode=4, context_len=16, tp=2)
CONFIG = MeasureConfig(warmup=0, repeats=2, collective_timeout_s=3.0)
LIMIT_S = 180.0  # each trial's time limit: far above a measure here, even beside two CPU hogs and another
# worker (a replacement actor importing torch there took over 60 s, 2026-12-07)
HANG_LIMIT_S = 1.0  # a hung trial's: it ends within this and the transport's grace
ALL = ("raise", "exit", "hang")


def schedule(label: str) -> Schedule:
    return Schedule(split_sizes=(1, 3) if label.startswith("poison") else (2, 2), label=label)


# --- vLLM's worker, faked at collective_rpc ---------------------------------------------------

class FakeLLM:
    """vLLM's LLM as the tuning Engine uses it: collective_rpc runs the TuningWorker method in its
    'worker' (a thread), pickling both ways; past `timeout` it raises TimeoutError, and a worker
    that died (WorkerDied) an error, after which the engine is dead."""

    def __init__(self) -> None:
        self.worker = vllm_engine.TuningWorker()
        self.dead = False
        self.llm_engine = self
        self.engine_core = self
        self.shut = False

    def shutdown(self) -> None:
        self.shut = True

    def collective_rpc(self, method, timeout=None, args=()):
        if self.dead or self.shut:
            raise RuntimeError("EngineDeadError: the engine core is dead")
        args = pickle.loads(pickle.dumps(args))
        box = {}

        def work():
            try:
                box["answer"] = pickle.dumps(getattr(self.worker, method)(*args))
            except WorkerDied:
                box["died"] = True

        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            self.dead = True
            raise TimeoutError(f"RPC call to {method} timed out.")
        if box.get("died"):
            self.dead = True
            raise RuntimeError("Worker proc VllmWorker-0 died unexpectedly, shutting down executor.")
        return [pickle.loads(box["answer"])]


@pytest.fixture
def fake_vllm(monkeypatch):
    """VllmTarget over the fake: each engine start is a fresh worker (a fresh Station)."""
    monkeypatch.setattr(Faulty, "exit", staticmethod(lambda code: (_ for _ in ()).throw(WorkerDied())))
    monkeypatch.setattr(vllm_engine, "_ENGINE", [])
    monkeypatch.setattr("dynaflow.tuner.targets.VLLM_GRACE_S", 1.0)
    starts = []

    def start(w):
        monkeypatch.setattr(vllm_engine, "_STATION", Station(lambda _, c: remote_faults.local(W, c)))
        engine = vllm_engine.Engine.__new__(vllm_engine.Engine)
        engine.llm, engine.folder = FakeLLM(), w.model
        vllm_engine._ENGINE.append(engine)
        starts.append(engine.llm)
        return engine, {"request_tokens": (1,) * 4, "context_len": 16}

    monkeypatch.setattr(vllm_engine, "start", start)
    target = VllmTarget(Workload(model="vllm:/models/tiny", num_decode=4, context_len=16), CONFIG)
    target.starts = starts
    yield target
    target.close()


@pytest.fixture
def tp_group(monkeypatch):
    monkeypatch.setattr(tp_module, "GRACE_S", 1.0)
    target = TPTarget(W_TP, CONFIG, build=remote_faults.local)
    yield target
    target.close()


@pytest.fixture(scope="module")
def ray_pool():
    ray = pytest.importorskip("ray")
    from dynaflow.tuner.ray_fanout import PoolConfig, RayPool

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS}})
    pool = RayPool(PoolConfig(workers=2, grace_s=2.0), make_target=remote_faults.local)
    [group] = pool.groups(W).values()
    yield pool, group
    pool.close()
    ray.shutdown()


def ray_target(ray_pool):
    from dynaflow.tuner.ray_fanout import ActorTarget
    return ActorTarget(*ray_pool)


def ray_group_pool(ray_pool):
    from dynaflow.tuner.ray_fanout import GroupPool
    return GroupPool(*ray_pool)


# --- the rules ----------------------------------------------------------------------------------

def check_target(target, faults=ALL) -> None:
    """A target's rules, one trial at a time."""
    first = target.measure(schedule("first"), time_limit_s=LIMIT_S)
    assert first.ok and first.notes["measured"] == "first", first
    assert isinstance(target.explain(schedule("first")), dict)
    if "raise" in faults:
        m = target.measure(schedule("poison-raise"), time_limit_s=LIMIT_S)
        assert m.outcome is TrialOutcome.CRASHED and "RuntimeError: poisoned schedule" in m.message, m
        after = target.measure(schedule("after-raise"), time_limit_s=LIMIT_S)
        assert after.ok and after.notes["measured"] == "after-raise", after
    if "exit" in faults:
        m = target.measure(schedule("poison-exit"), time_limit_s=LIMIT_S)
        assert m.outcome is TrialOutcome.CRASHED and m.killed_worker, m
        after = target.measure(schedule("after-exit"), time_limit_s=LIMIT_S)
        assert after.ok and after.notes["measured"] == "after-exit", after
    if "hang" in faults:
        t0 = time.monotonic()
        m = target.measure(schedule("poison-hang"), time_limit_s=HANG_LIMIT_S)
        assert m.outcome is TrialOutcome.TIMEOUT and m.killed_worker, m
        assert time.monotonic() - t0 < HANG_LIMIT_S + 30  # the limit and the transport's grace, not the hour it sleeps
        after = target.measure(schedule("after-hang"), time_limit_s=LIMIT_S)
        assert after.ok and after.notes["measured"] == "after-hang", after


def check_pool(pool, faults=ALL) -> None:
    """A pool's rules: paired jobs, as many at once as it takes, answered once each, each result
    its own job's."""
    labels = ["a", "b", "c", *(f"poison-{f}" for f in faults), "d", "e", "f"]
    jobs = [Job(id=i, schedule=schedule(label), time_limit_s=HANG_LIMIT_S if label == "poison-hang" else LIMIT_S,
                paired=True) for i, label in enumerate(labels)]
    pending, done = list(jobs), {}
    deadline = time.monotonic() + 600
    while len(done) < len(jobs):
        while pending and pool.free() > 0:
            pool.submit(pending.pop(0))
        for d in pool.wait(0.2):
            assert d.job.id not in done, f"job {d.job.id} answered twice"
            done[d.job.id] = d
        assert time.monotonic() < deadline, f"answered {sorted(done)} of {len(jobs)} jobs"
    for job in jobs:
        m, label = done[job.id].measurement, job.schedule.label
        if label == "poison-raise":
            assert m.outcome is TrialOutcome.CRASHED and "poisoned schedule" in m.message, m
        elif label == "poison-exit":
            assert m.outcome is TrialOutcome.CRASHED and m.killed_worker, m
        elif label == "poison-hang":
            assert m.outcome is TrialOutcome.TIMEOUT and m.killed_worker, m
        else:
            assert m.ok and m.notes["measured"] == label and m.baseline_samples_ms, (label, m)


# --- every target ---------------------------------------------------------------------------------

def test_a_tensor_parallel_group_keeps_the_rules(tp_group):
    check_target(tp_group)
    assert len(tp_group.ranks) == 2


def test_vllms_worker_keeps_the_rules(fake_vllm):
    check_target(fake_vllm)
    assert len(fake_vllm.starts) == 3  # the first engine, and one after each lost worker
    assert [llm.shut for llm in fake_vllm.starts] == [True, True, False]  # a lost worker's engine is shut down


def test_a_ray_actor_keeps_the_rules(ray_pool):
    check_target(ray_target(ray_pool))


# --- every pool -----------------------------------------------------------------------------------

def test_the_inline_pool_keeps_the_rules_in_this_process():
    """In this process only a raise can be survived: a process that exits or hangs is the tuner."""
    check_pool(InlinePool(remote_faults.local(W)), faults=("raise",))


def test_the_inline_pool_keeps_the_rules_over_vllms_worker(fake_vllm):
    check_pool(InlinePool(fake_vllm))


def test_the_ray_pool_keeps_the_rules(ray_pool):
    pool = ray_group_pool(ray_pool)
    check_pool(pool)
    deadline = time.monotonic() + 120
    while pool.starting and time.monotonic() < deadline:  # the last replacement preparing
        pool.wait(0.5)
    assert pool.free() == 2 and not pool.starting  # both workers back, the replacements prepared


def test_the_loops_fake_pool_keeps_the_rules():
    """tests/test_pool.py's FakePool, which the tuning loop's tests run on: its poison kills a worker."""
    from test_pool import FakePool

    check_pool(FakePool(remote_faults.local(W)), faults=("exit",))


# --- the protocol itself ------------------------------------------------------------------------

def test_a_station_answers_every_request_and_never_raises():
    station = Station(lambda w, c: remote_faults.local(w, c))
    assert station.handle(Measure(schedule("early"))).error == "Measure before any Prepare: no workload is built here"
    bad = station.handle(Prepare(Workload(model="no_such_module:make_case", num_decode=4, context_len=16)))
    assert bad.value is None and "no_such_module" in bad.error, bad
    described = station.handle(Prepare(W, CONFIG)).value
    assert described.graph.module is None and described.layout.num_requests == 4  # weightless, picklable
    pickle.dumps(described)
    assert station.handle(Measure(schedule("x"), paired=True)).value.baseline_samples_ms
    assert station.handle(Measure(schedule("poison-raise"))).value.outcome is TrialOutcome.CRASHED
    assert isinstance(station.handle(Explain(schedule("x"))).value, dict)
    assert station.handle("measure please").error == "not a request of tuner/remote.py: str"
    assert isinstance(station.handle(Explain(schedule("x"))), Reply)
