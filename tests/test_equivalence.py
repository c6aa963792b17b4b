"""Conformance: every backend gives the sequential reference's output for any valid schedule."""
import random
import weakref

import pytest
import torch

from dynaflow.runtime import Executor, Schedule, Workload
from dynaflow.runtime.measure import Bench, tolerance_for
from schedules import random_schedule

from conftest import BACKENDS

CASES = {
    "llama-tiny": dict(model="llama-tiny", num_decode=6, context_len=24, prefill_tokens=24, prefill_chunk=8),
    "mixtral-tiny": dict(model="mixtral-tiny", num_decode=5, context_len=16, prefill_tokens=16, prefill_chunk=8),
    "user-gated-block": dict(model="user_models:gated_block", num_decode=11),
    "llama-decode-only": dict(model="llama-tiny", num_decode=9, context_len=12),
    "mixtral-prefill-only": dict(model="mixtral-tiny", prefill_tokens=32, prefill_chunk=8),
}
NUM_RANDOM = 50  # per case: 250 random schedules in all


def _executor(name: str, device: str) -> Executor:
    case = Workload(**CASES[name], device=device).build()
    return Executor(case)


_TOLERANCES = weakref.WeakKeyDictionary()


def assert_equal_to_reference(out: torch.Tensor, ref: torch.Tensor, ex: Executor) -> None:
    """Equal within the tolerance Bench derives for this model and batch (computed once per executor)."""
    if ex not in _TOLERANCES:
        _TOLERANCES[ex] = tolerance_for(ex, ref)
    tol = _TOLERANCES[ex]
    torch.testing.assert_close(out, ref, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_random_schedules_equal_sequential(name, device):
    ex = _executor(name, device)
    ref = ex.reference().clone()
    rng = random.Random(f"{name}-{device}")
    kinds = set()
    for i in range(NUM_RANDOM):
        schedule = random_schedule(ex.graph, ex.case.layout, rng, cuda_graph=device == "cuda" and i % 2 == 0)
        run = ex.compile(schedule)
        try:
            run().zero_() if i % 7 == 0 else None  # a stale output buffer must not leak into the next run
            out = run()
            assert_equal_to_reference(out, ref, ex)
        finally:
            run.close()
        kinds.add((schedule.num_nano > 1, len(schedule.streams) > 1, bool(schedule.order)))
    assert len(kinds) >= 6, f"the generator covered too few kinds of schedule: {kinds}"


@pytest.mark.parametrize("device", BACKENDS)
def test_sequential_schedule_is_bitwise_equal(device):
    ex = _executor("llama-tiny", device)
    ref = ex.reference().clone()
    assert torch.equal(ex.compile(Schedule())(), ref)


@pytest.mark.parametrize("device", BACKENDS)
def test_mixing_model_is_caught_by_verification(device):
    """A model whose rows interact cannot be nano-batched: measure says INCORRECT, not fast."""
    bench = Bench(Workload(model="user_models:batch_mixing", num_decode=8, device=device))
    assert bench.measure(Schedule()).ok
    m = bench.measure(Schedule(split_sizes=(3, 5)))
    assert m.outcome.value == "incorrect"
    assert m.error_ratio > 1 and "differs from the sequential reference" in m.message


def test_copy_join_fallback_is_correct():
    ex = _executor_for("user_models:no_residual")
    assert not ex.graph.writes_output
    ref = ex.reference().clone()
    out = ex.compile(Schedule(split_sizes=(2, 3, 3)))()
    assert_equal_to_reference(out, ref, ex)


def _executor_for(model: str) -> Executor:
    return Executor(Workload(model=model, num_decode=8).build())
