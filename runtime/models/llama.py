"""A Llama-style decoder layer in plain torch, for mixed decode + prefill batches.

Inputs (dim 0 is the batch axis the runtime splits on):
    x            [T, H]            decode tokens first (one per decode request), then prefill tokens
    k_cache      [D, C+1, KV, Dh]  per decode request; slot C receives the new token's key
    v_cache      [D, C+1, KV, Dh]
    decode_pos   [D]               position of each decode token (= its context length C)
    prefill_pos  [P, L]            positions of each prefill request's L tokens
Each child module is one op of the runtime's graph; the forward only slices and adds between them.

Tensor parallelism (`tp` > 1): the layer is one rank's shard, built from `cfg.shard(tp)`: qkv_proj
and gate_up_proj are column-parallel (the rank's heads, its slice of the intermediate size),
o_proj and down_proj row-parallel, each followed by an all-reduce op (`attn_allreduce`,
`mlp_allreduce`) that sums the ranks' partial results; the norms are replicated. `init_shard`
slices the rank's weights out of the ones `init_weights` gives the unsharded layer.
Sequence parallelism (`sequence_parallel`, with tp > 1): each all-reduce becomes a reduce-scatter
(`attn_reduce_scatter`, `mlp_reduce_scatter`: each rank keeps its share of the token rows), the
residual adds and the MLP norm run on that share only, and all-gathers (`mlp_all_gather` before
the MLP, `out_all_gather` at the end) give the rows back; the layer's input and output stay whole.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import AllGather, AllReduce, ReduceScatter


@dataclass(kw_only=True, slots=True, frozen=True)
class LlamaConfig:
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    head_dim: int = 128
    rope_theta: float = 500000.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, but got {self.num_heads} and {self.num_kv_heads}."
            )

    def shard(self, tp: int) -> "LlamaConfig":
        """One rank's share at tensor parallelism `tp`: its heads, kv heads and intermediate slice."""
        bad = [f"{n}={getattr(self, n)}" for n in ("num_heads", "num_kv_heads", "intermediate") if getattr(self, n) % tp]
        if bad:
            raise ValueError(f"tp={tp} must divide the model's heads, kv heads and intermediate size, but "
                             f"{', '.join(bad)} is not a multiple of {tp}.")
        return dataclasses.replace(self, num_heads=self.num_heads // tp, num_kv_heads=self.num_kv_heads // tp,
                                   intermediate=self.intermediate // tp)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Rope(nn.Module):
    """Rotates q and k of all tokens; positions of decode then prefill tokens."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, qkv: torch.Tensor, decode_pos: torch.Tensor, prefill_pos: torch.Tensor):
        c = self.cfg
        pos = torch.cat([decode_pos.reshape(-1), prefill_pos.reshape(-1)]).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        q = _rotate(q.unflatten(-1, (c.num_heads, c.head_dim)), cos, sin)
        k = _rotate(k.unflatten(-1, (c.num_kv_heads, c.head_dim)), cos, sin)
        return q, k, v.unflatten(-1, (c.num_kv_heads, c.head_dim))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class DecodeAttention(nn.Module):
    """One new token per request attends over its KV cache (memory-bound)."""

    def forward(self, q, k, v, k_cache, v_cache, decode_pos):
        rows = torch.arange(k_cache.shape[0], device=k_cache.device)
        k_cache.index_put_((rows, decode_pos), k)
        v_cache.index_put_((rows, decode_pos), v)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), enable_gqa=True
        )
        return out.flatten(1)


class PrefillAttention(nn.Module):
    """Causal attention within each prefill request (compute-bound)."""

    def forward(self, q, k, v, prefill_pos):
        shape = (prefill_pos.shape[0], prefill_pos.shape[1])
        q, k, v = (t.unflatten(0, shape).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).flatten(0, 1).flatten(1)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up


class LlamaLayer(nn.Module):
    """`cfg`: the layer's own dimensions (a shard's, `full.shard(tp)`, at tensor parallelism `tp`)."""

    def __init__(self, cfg: LlamaConfig, tp: int = 1, sequence_parallel: bool = False) -> None:
        super().__init__()
        self._init_attention(cfg, tp, sequence_parallel)
        self.gate_up_proj = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=False)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)
        self._init_mlp_collectives()

    def _init_attention(self, cfg: LlamaConfig, tp: int, sequence_parallel: bool) -> None:
        if sequence_parallel and tp < 2:
            raise ValueError(f"sequence parallelism needs tp > 1, but got tp={tp}.")
        self.cfg, self.tp, self.sp = cfg, tp, sequence_parallel
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.qkv_proj = nn.Linear(cfg.hidden, qkv_out, bias=False)
        self.rope = Rope(cfg)
        self.decode_attn = DecodeAttention()
        self.prefill_attn = PrefillAttention()
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden, bias=False)
        if sequence_parallel:
            self.attn_reduce_scatter = ReduceScatter()
        elif tp > 1:
            self.attn_allreduce = AllReduce()
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.eps)

    def _init_mlp_collectives(self) -> None:
        if self.sp:
            self.mlp_all_gather, self.mlp_reduce_scatter, self.out_all_gather = AllGather(), ReduceScatter(), AllGather()
        elif self.tp > 1:
            self.mlp_allreduce = AllReduce()

    def attention(self, x, k_cache, v_cache, decode_pos, prefill_pos):
        """Residual stream after attention: x + o_proj(attn(x))."""
        q, k, v = self.rope(self.qkv_proj(self.attn_norm(x)), decode_pos, prefill_pos)
        d = decode_pos.shape[0]
        attn_d = self.decode_attn(q[:d], k[:d], v[:d], k_cache, v_cache, decode_pos)
        attn_p = self.prefill_attn(q[d:], k[d:], v[d:], prefill_pos)
        o = self.o_proj(torch.cat([attn_d, attn_p]))
        if self.sp:  # this rank's rows of the residual stream
            return self.attn_reduce_scatter.rows(x) + self.attn_reduce_scatter(o)
        if self.tp > 1:
            o = self.attn_allreduce(o)
        return x + o

    def forward(self, x, k_cache, v_cache, decode_pos, prefill_pos):
        h = self.attention(x, k_cache, v_cache, decode_pos, prefill_pos)
        if self.sp:
            hn = self.mlp_all_gather(self.mlp_norm(h))
            h = h + self.mlp_reduce_scatter(self.down_proj(self.act(self.gate_up_proj(hn))))
            return self.out_all_gather(h)[:x.shape[0]]
        m = self.down_proj(self.act(self.gate_up_proj(self.mlp_norm(h))))
        if self.tp > 1:
            m = self.mlp_allreduce(m)
        return h + m


def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Random weights scaled so activations stay O(1) through the layer (no checkpoint needed)."""
    with torch.no_grad():
        for name, p, value in _initial_values(model, seed):
            p.copy_(value)
    return model


def _initial_values(model: nn.Module, seed: int):
    """(name, parameter, its initial value) in parameter order, from one generator: matrices
    randn / sqrt(fan-in), norms 1 + 0.1 randn, the rest left as they are. The one place the values
    are drawn, so a shard (init_shard) holds exactly the unsharded layer's."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            yield name, p, torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        elif "norm" in name:
            yield name, p, 1.0 + 0.1 * torch.randn(p.shape, generator=gen)


def init_shard(shard: nn.Module, full: nn.Module, seed: int, *, tp: int, rank: int) -> nn.Module:
    """The weights `init_weights(full, seed)` gives, each sliced to rank `rank`'s share of `shard`
    (tensor parallelism `tp`). `full` may live on the meta device: each full weight is made once,
    sliced, and dropped, so the unsharded layer is never held whole."""
    params = dict(shard.named_parameters())
    with torch.no_grad():
        for name, _, value in _initial_values(full, seed):
            params[name].copy_(_slice(name, value, full.cfg, tp, rank))
    return shard


def _slice(name: str, full: torch.Tensor, cfg: LlamaConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a full weight: column-parallel rows, row-parallel columns, else all."""
    module = name.split(".")[-2]
    if module == "qkv_proj":  # [q | k | v] rows, each cut by heads
        parts = full.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                            cfg.num_kv_heads * cfg.head_dim])
        return torch.cat([part.chunk(tp)[rank] for part in parts])
    if module == "gate_up_proj":  # [gate | up] rows
        return torch.cat([part.chunk(tp)[rank] for part in full.chunk(2)])
    if module in ("o_proj", "down_proj"):
        return full.chunk(tp, dim=1)[rank]
    return full
