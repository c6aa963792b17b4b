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


def test_sm_partitions_are_granted_or_explained():
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=3))
    sms = bench.hardware.num_sms
    m = bench.measure(Schedule(streams=(StreamSpec(sm_share=sms // 2), StreamSpec(sm_share=sms // 4))))
    assert m.ok, m.message
    assert m.notes["partition"].startswith(("green contexts, granted", "unavailable:"))


def test_gpu_fingerprint_and_telemetry():
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=3))
    assert bench.hardware.kind == "cuda" and bench.hardware.num_sms == torch.cuda.get_device_properties(0).multi_processor_count
    assert "sm_clock_mhz" in bench.measure(Schedule()).telemetry


def test_many_share_sets_keep_a_bounded_number_of_green_contexts():
    bench = Bench(W, config=MeasureConfig(warmup=1, repeats=2))
    sets = bench.executor.backend._sets
    for share in range(8, 8 * (sets.capacity + 6), 8):
        share = min(share, bench.hardware.num_sms - 8) // 8 * 8  # both shares in 8-SM steps, within the device
        m = bench.measure(Schedule(split_sizes=(4, 6), streams=(StreamSpec(sm_share=share), StreamSpec(sm_share=8))))
        assert m.ok, m.message
        assert len(sets) <= sets.capacity and all(e.users == 0 for e in sets._sets.values())
