"""CUDA-only behaviour: CUDA-graph capture, green-context partitions. Skipped without a GPU."""
import pytest
import torch

from dynaflow.runtime import Bench, MeasureConfig, Schedule, StreamSpec, Workload

pytestmark = pytest.mark.cuda

W = Workload(model="llama-tiny", num_decode=8, context_len=64, prefill_tokens=32, prefill_chunk=16,
             dtype="bfloat16", device="cuda")


def test_cuda_graph_replay_equals_reference():
    bench = Bench(W, config=MeasureConfig(warmup=2, repeats=5))
    for graph in (False, True):
        m = bench.measure(Schedule(split_sizes=(4, 6), streams=(StreamSpec(), StreamSpec()), cuda_graph=graph))
        assert m.ok, m.message
        assert ("cuda_graph" in m.notes) == graph


def _stack_has_green_contexts() -> bool:
    try:
        from cuda.bindings import driver
    except ImportError:
        return False
    return hasattr(driver, "cuGreenCtxCreate") and hasattr(driver, "cuGreenCtxStreamCreate")


def _shares(bench) -> tuple[int, int]:
    step = 8 if float(bench.hardware.arch) >= 9.0 else 4
    return step * (bench.hardware.num_sms // step // 2), step * 2


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_sm_partitions_are_granted_where_the_stack_has_green_contexts(graph):
    """"unavailable" passes only on a stack without green contexts, never on one that has them."""
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=3))
    shares = _shares(bench)
    m = bench.measure(Schedule(split_sizes=(4, 6), streams=tuple(StreamSpec(sm_share=s) for s in shares),
                               cuda_graph=graph))
    assert m.ok, m.message
    if _stack_has_green_contexts():
        assert m.notes["partition"] == f"green contexts, granted SMs {list(shares)} for requested {list(shares)}"
    else:
        assert m.notes["partition"].startswith("unavailable: ")


def test_a_torch_event_on_a_green_stream_is_never_recorded():
    """The backend records only green-context events on green streams; a timeline too."""
    from dynaflow.runtime.timeline import record_timeline
    if not _stack_has_green_contexts():
        pytest.skip("no green contexts in this stack")
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=3))
    run = bench.executor.compile(Schedule(split_sizes=(4, 6), streams=tuple(StreamSpec(sm_share=s) for s in _shares(bench))))
    try:
        assert len(record_timeline(run, runs=2).spans) == len(run.plan.tasks)
    finally:
        run.close()


def test_gpu_fingerprint_and_telemetry():
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=3))
    assert bench.hardware.kind == "cuda" and bench.hardware.num_sms == torch.cuda.get_device_properties(0).multi_processor_count
    assert "sm_clock_mhz" in bench.measure(Schedule()).telemetry


def test_many_share_sets_keep_a_bounded_number_of_green_contexts():
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=2))
    sets = bench.executor.backend._sets
    for share in range(8, 8 * (sets.capacity + 6), 8):
        share = min(share, bench.hardware.num_sms - 16) // 8 * 8  # both shares in 8-SM steps, within the device
        m = bench.measure(Schedule(split_sizes=(4, 6), streams=(StreamSpec(sm_share=share), StreamSpec(sm_share=8))))
        assert m.ok, m.message
        assert len(sets) <= sets.capacity and all(e.users == 0 for e in sets._sets.values())
