"""A Mixtral-style MoE decoder layer: Llama attention, then a router and top-k of E experts.

Each expert is one op of the runtime's graph. The accumulator is threaded through the
experts (`out = out.index_add_(...)`) so the data flow, which the runtime's dependencies are
derived from, orders the in-place updates.
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
    def __init__(self, cfg: MoEConfig) -> None:
        nn.Module.__init__(self)
        self._init_attention(cfg)
        self.router = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden, cfg.intermediate) for _ in range(cfg.num_experts))

    def forward(self, x, k_cache, v_cache, decode_pos, prefill_pos):
        h = self.attention(x, k_cache, v_cache, decode_pos, prefill_pos)
        hn = self.mlp_norm(h)
        probs = self.router(hn).float().softmax(-1)
        weights, chosen = torch.topk(probs, self.cfg.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(hn.dtype)
        out = torch.zeros_like(hn)
        for e, expert in enumerate(self.experts):
            where = (chosen == e).nonzero()
            tok, slot = where[:, 0], where[:, 1]
            out = out.index_add_(0, tok, expert(hn[tok]) * weights[tok, slot, None])
        return h + out
