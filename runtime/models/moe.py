"""A Mixtral-style MoE decoder layer: Llama attention, then a router and top-k of E experts.

Each expert is one op of the runtime's graph. The accumulator is threaded through the
experts (`out = out.addcmul_(...)`) so the data flow, which the runtime's dependencies are
derived from, orders the in-place updates.

No op waits for the device: routing gathers no tokens by value (no `nonzero`, no `.item()`, no
shape that depends on the router), so a layer can be captured in a CUDA graph and its streams
never stall the host. Each expert runs on every token of its nano-batch and a token's result is
weighted by its routing weight, zero where the expert was not chosen: the same sum as gathering
the chosen tokens, at num_experts/top_k times the expert FLOPs. (A grouped GEMM over sorted tokens
would do the chosen tokens only; torch's `_grouped_mm` is free of host syncs only for bf16 on
sm_90+, and falls back to reading the group offsets on the host elsewhere.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .llama import LlamaConfig, LlamaLayer, SiluAndMul


@dataclass(kw_only=True, slots=True, frozen=True)
class MoEConfig(LlamaConfig):
    num_experts: int = 8
    top_k: int = 2

    def __post_init__(self) -> None:
        LlamaConfig.__post_init__(self)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], but got {self.top_k}.")


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class MixtralLayer(LlamaLayer):
    """At tensor parallelism `tp` each expert is sharded like the dense MLP (the router is replicated,
    so every rank routes alike) and one all-reduce sums the experts' partial outputs; with sequence
    parallelism a reduce-scatter does, and the router and experts read the all-gathered rows."""

    def __init__(self, cfg: MoEConfig, tp: int = 1, sequence_parallel: bool = False) -> None:
        nn.Module.__init__(self)
        self._init_attention(cfg, tp, sequence_parallel)
        self.router = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden, cfg.intermediate) for _ in range(cfg.num_experts))
        self._init_mlp_collectives()

    def forward(self, x, k_cache, v_cache, decode_pos, prefill_pos):
        h = self.attention(x, k_cache, v_cache, decode_pos, prefill_pos)
        hn = self.mlp_all_gather(self.mlp_norm(h)) if self.sp else self.mlp_norm(h)
        probs = self.router(hn).float().softmax(-1)
        weights, chosen = torch.topk(probs, self.cfg.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(hn.dtype)
        combine = torch.zeros_like(probs, dtype=hn.dtype).scatter_(-1, chosen, weights)  # (tokens, experts)
        out = torch.zeros_like(hn)
        for e, expert in enumerate(self.experts):
            out = out.addcmul_(expert(hn), combine[:, e, None])
        if self.sp:
            return self.out_all_gather(h + self.mlp_reduce_scatter(out))[:x.shape[0]]
        if self.tp > 1:
            out = self.mlp_allreduce(out)
        return h + out
