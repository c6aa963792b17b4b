"""Workloads and batch layouts: stable keys, errors that name the field, zero-copy nano-batches."""
import pytest
import torch

from dynaflow.runtime import BatchLayout, Executor, Schedule, Workload
from dynaflow.runtime.counters import BytesCounterMode


def test_key_is_stable_and_names_the_batch():
    w = Workload(model="llama3-8b", num_decode=256, context_len=2048, prefill_tokens=512, dtype="bfloat16")
    assert w.key == "llama3-8b_d256x2048_p512_bf16"
    assert Workload(model="llama3-8b", num_decode=256, context_len=2048, prefill_tokens=512,
                    dtype="bfloat16", device="cuda:3").key == w.key
    assert Workload(model="x.y:make", num_decode=4).key == "x.y-make_d4x0_p0_fp32"


@pytest.mark.parametrize("kwargs, words", [
    (dict(model="gpt5"), ["model", "'gpt5'", "llama3-8b"]),
    (dict(num_decode=-1), ["num_decode", ">= 0", "-1"]),
    (dict(num_decode=4), ["context_len", ">= 1"]),
    (dict(prefill_tokens=10, prefill_chunk=4), ["prefill_chunk", "divide", "10"]),
    (dict(prefill_tokens=8, dtype="int8"), ["dtype", "'int8'"]),
    (dict(prefill_tokens=8, device="tpu"), ["device", "'tpu'"]),
    (dict(), ["num_decode > 0 or prefill_tokens > 0"]),
])
def test_invalid_workload_names_the_field(kwargs, words):
    with pytest.raises(ValueError) as e:
        Workload(**{"model": "llama-tiny", **kwargs})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_user_callable_that_does_not_import():
    with pytest.raises(ValueError, match="cannot import 'nope' from 'user_models'"):
        Workload(model="user_models:nope", num_decode=2).build()


def test_layout_token_splits_map_to_request_ranges():
    layout = BatchLayout(request_tokens=(1, 1, 4, 4), request_kinds=("decode",) * 2 + ("prefill",) * 2,
                         input_axes=("tokens", "decode", "prefill"))
    assert layout.request_ranges("tokens", (2, 8)) == [(0, 2), (2, 4)]
    assert layout.request_ranges("requests", (3, 1)) == [(0, 3), (3, 4)]
    sl = layout.slices(1, 3)
    assert sl["tokens"] == slice(1, 6) and sl["decode"] == slice(1, 2) and sl["prefill"] == slice(0, 1)


def test_layout_rejects_bad_axes():
    with pytest.raises(ValueError, match=r"input_axes\[1\]='heads'"):
        BatchLayout(request_tokens=(1,), request_kinds=("decode",), input_axes=("tokens", "heads"))


def _split_run(model: str):
    w = Workload(model=model, num_decode=6, context_len=16, prefill_tokens=16, prefill_chunk=8)
    ex = Executor(w.build())
    ref = ex.reference().clone()
    run = ex.compile(Schedule(split_sizes=(3, 3, 2)))
    return ex, ref, run


@pytest.mark.parametrize("model", ["llama-tiny", "mixtral-tiny"])
def test_nano_batches_are_views_and_outputs_land_in_place(model):
    ex, ref, run = _split_run(model)
    run.plan.reset()
    for env in run.plan.envs:
        views = list(env.values())
        for view, full in zip(views, ex.case.inputs):
            assert view.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()  # a view, not a copy
        assert views[-1].untyped_storage().data_ptr() == run.out.untyped_storage().data_ptr()
    out = run()
    last = [env[n] for env in run.plan.envs for n in env if getattr(n, "op", "") == "call_module"]
    for value in last:  # the op that ends the layer returned the out slice itself
        assert value.untyped_storage().data_ptr() == run.out.untyped_storage().data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["llama-tiny", "mixtral-tiny"])
def test_split_and_join_copy_no_bytes(model):
    """The runtime adds no copy: a split run moves exactly the copy bytes the model itself does."""
    ex, ref, run = _split_run(model)
    eager, scheduled = BytesCounterMode(), BytesCounterMode()
    with torch.no_grad(), eager:
        ex.case.model(*ex.case.inputs)
    with scheduled:
        run()
    assert eager.copy_bytes > 0  # the model's own cat and cache writes are seen ...
    assert scheduled.copy_bytes == eager.copy_bytes  # ... and the runtime adds none


def test_copy_join_fallback_is_reported():
    ex = Executor(Workload(model="user_models:no_residual", num_decode=8).build())
    ex.reference()
    assert ex.compile(Schedule(split_sizes=(4, 4))).plan.join_copies


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error():
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch .* sees no CUDA device"):
        Workload(model="llama-tiny", num_decode=2, context_len=4, device="cuda").build()


def test_a_layout_with_every_input_whole_and_the_output_batched_is_refused():
    """Each nano-batch would see the whole batch and write a whole-batch output into its slice
    (torch's "output was resized" warning the only sign): refused by the runtime, not only by
    the tuner's verification."""
    from dynaflow.runtime import BatchLayout

    with pytest.raises(ValueError, match=r"input_axes=\(None,\) declares every input whole, but the output is batched"):
        BatchLayout(request_tokens=(1,) * 4, request_kinds=("requests",) * 4, input_axes=(None,), output_axis="requests")
    BatchLayout(request_tokens=(1,) * 4, request_kinds=("requests",) * 4, input_axes=(None, "requests"),
                output_axis="requests")  # one whole input beside a batched one is fine
