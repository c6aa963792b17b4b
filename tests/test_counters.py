"""FLOPs of attention: every SDPA variant (CPU flash, CUDA flash, efficient, cuDNN, the
overrideable one, math) counted with grouped-query heads, against a hand count. The CUDA
variants run on meta tensors (their shape functions), so the counts are checked on a CPU."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter as torch_flop_counter

from dynaflow.runtime.counters import count

A = torch.ops.aten
B, HQ, HKV, SQ, SK, E = 2, 8, 2, 16, 24, 32


def hand_count(*, sq=SQ, sk=SK) -> int:
    return 2 * B * HQ * sq * sk * E + 2 * B * HQ * sq * sk * E  # QK^T, then P V, per query head


def qkv(device="cpu", *, sq=SQ, sk=SK):
    return (torch.randn(B, HQ, sq, E, device=device), torch.randn(B, HKV, sk, E, device=device),
            torch.randn(B, HKV, sk, E, device=device))


def fused(op, q, k, v, causal):
    """Each variant called as SDPA calls it (positional arguments per its schema)."""
    if op is A._scaled_dot_product_flash_attention_for_cpu or op is A._scaled_dot_product_flash_attention:
        return op(q, k, v, 0.0, causal)
    if op is A._scaled_dot_product_efficient_attention:
        return op(q, k, v, None, False, 0.0, causal)
    if op is A._scaled_dot_product_cudnn_attention:
        return op(q, k, v, None, False, 0.0, causal)
    return op(q, k, v, None, 0.0, causal)  # the overrideable one


CUDA_VARIANTS = [A._scaled_dot_product_flash_attention, A._scaled_dot_product_efficient_attention,
                 A._scaled_dot_product_cudnn_attention]


@pytest.fixture
def torch_211_formulas(monkeypatch):
    """torch 2.11's own formulas for the CUDA variants assert equal head counts: replace them so,
    and only our mapping can count grouped-query attention."""
    def asserting(query_shape, key_shape, *args, **kwargs):
        assert query_shape[1] == key_shape[1], "torch 2.11: flash/efficient/cuDNN need equal head counts"
        return 0
    for op in CUDA_VARIANTS:
        monkeypatch.setitem(torch_flop_counter.flop_registry, op, torch_flop_counter.shape_wrapper(asserting))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("op", CUDA_VARIANTS, ids=lambda op: op.__name__)
def test_cuda_variants_count_grouped_query_attention(op, causal, torch_211_formulas):
    q, k, v = qkv("meta")
    counts = count(lambda: fused(op, k=k, q=q, v=v, causal=causal))[1]
    assert counts.flops == hand_count()


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_flash_counts_what_the_math_kernel_counts(causal):
    q, k, v = qkv()
    flash = count(lambda: fused(A._scaled_dot_product_flash_attention_for_cpu, q, k, v, causal))[1].flops
    with sdpa_kernel([SDPBackend.MATH]):
        math = count(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))[1].flops
    assert flash == math == hand_count()


def test_sdpa_on_the_cpu_default_path_counts_decode_and_prefill():
    """What the models call: one query per request against a long cache, and a square prefill."""
    q, k, v = qkv(sq=1, sk=512)
    assert count(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))[1].flops == hand_count(sq=1, sk=512)
    q, k, v = qkv(sq=64, sk=64)
    out = count(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))[1]
    assert out.flops == hand_count(sq=64, sk=64)


def test_the_overrideable_variant_uses_the_same_formula():
    from dynaflow.runtime.counters import ATTENTION_OPS, attention_flops, flop_counter
    assert A._scaled_dot_product_fused_attention_overrideable in ATTENTION_OPS
    assert attention_flops([B, HQ, SQ, E], [B, HKV, SK, E], [B, HKV, SK, E]) == hand_count()
    registry = flop_counter().flop_registry
    assert all(registry[op].__wrapped__ is attention_flops for op in ATTENTION_OPS)


# --- host syncs: nothing in a built-in model makes the host wait for the device -------------------

from dynaflow.runtime import Executor, Workload  # noqa: E402
from dynaflow.runtime.counters import HostSyncs  # noqa: E402
from schedules import random_schedule  # noqa: E402
from test_equivalence import CASES, assert_equal_to_reference  # noqa: E402


def test_the_sync_detector_sees_each_kind_of_host_sync():
    """Mutation check: the MoE routing as it was (gather chosen tokens by value) is caught."""
    x, chosen = torch.randn(6, 4), torch.tensor([[0, 1], [1, 2], [0, 2], [3, 1], [0, 3], [2, 1]])
    for syncing in (lambda: (chosen == 1).nonzero(), lambda: x.sum().item(), lambda: x[x > 0],
                    lambda: bool((chosen == 9).any()), lambda: torch.repeat_interleave(chosen[:, 0])):
        with HostSyncs() as mode:
            syncing()
        assert mode.ops, syncing
    with HostSyncs() as mode:
        x[chosen[:, 0]], torch.topk(x, 2), torch.zeros(6, 4).scatter_(-1, chosen, x[:, :2])
    assert mode.ops == []


@pytest.mark.parametrize("name", ["mixtral-tiny", "mixtral-prefill-only", "llama-tiny"])
def test_built_in_models_make_no_host_sync_and_equal_the_reference(name):
    """Every task of the sequential and of random schedules, watched in the thread that runs it
    (dispatch modes are per thread, and the CPU backend runs a thread per stream)."""
    import random
    from dynaflow.runtime import Schedule
    ex = Executor(Workload(**CASES[name]).build())
    ref = ex.reference().clone()
    rng = random.Random(name)
    syncs: list[str] = []

    def watched(fn):
        def run() -> None:
            with HostSyncs() as mode:
                fn()
            syncs.extend(mode.ops)
        return run

    for schedule in [Schedule(), *(random_schedule(ex.graph, ex.case.layout, rng) for _ in range(5))]:
        run = ex.compile(schedule)
        for task in run.plan.tasks:
            task.fn = watched(task.fn)
        out = run()
        run.close()
        assert syncs == [], f"{name}: {schedule.label}: {syncs}"
        assert_equal_to_reference(out, ref, ex)
