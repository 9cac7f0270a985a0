"""Mixtral (transformers 5.x): softmax router, top-k renormalised, fused experts.

Read from transformers/models/mixtral/modeling_mixtral.py: the router computes
`F.linear(x, weight)`, a float32 softmax, top-k, and divides the top-k weights
by their sum; experts hold `gate_up_proj` (n, 2I, H; gate rows first) and
`down_proj` (n, H, I). Checkpoints on disk hold either those fused tensors or
the hub's per-expert `block_sparse_moe.experts.N.w{1,2,3}.weight`.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import RoutingSpec
from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    expert_count_keys = ("num_local_experts",)
    stacked_pattern = re.compile(
        r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?:gate_up_proj|down_proj)$"
    )
    router_pattern = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(top_k=self.top_k, scoring="softmax", renormalize=True)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        return layer.mlp

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return block.gate.weight

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, block.gate.weight)

    def expert_forward(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        experts = block.experts
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
