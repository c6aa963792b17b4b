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
