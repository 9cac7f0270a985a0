"""Llama 4 (transformers 5.x; `llama4_text`, and `llama4` checkpoints, whose language model
AutoModelForCausalLM loads).

From models/llama4/modeling_llama4.py: the router (`feed_forward.router`, an
nn.Linear without bias) takes the top-k logits, and each selected expert runs
on its input scaled by the sigmoid of its own logit: the block computes
shared_expert(x) + sum_j E_j(sigmoid(l_j) x), densely over all experts (the
unselected ones get x * 0 and, having no biases, return 0). The score depends
on the expert's own logit only, not on which experts are kept, so each
candidate's output E_j(sigmoid(l_j) x) is fixed per token and the block is a
unit-weighted sum of them (Weighting.UNIT). Experts are
`gate_up_proj` (n, H, 2I) and `down_proj` (n, I, H), multiplied from the right,
outside transformers' experts interface, so dynamic skipping is not offered.
MoE layers follow `moe_layers` / `interleave_moe_layer_step`; the others hold a
dense MLP. The block returns (output, router logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import RoutingSpec, Scoring, Weighting
from .base import MoEAdapter


class Llama4Adapter(MoEAdapter):
    model_types = ("llama4_text",)
    expert_count_keys = ("num_local_experts",)
    block_attr = "feed_forward"
    router_attr = "router"
    block_returns_tuple = True
    supports_skipping = False

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(top_k=self.top_k, scoring=Scoring.SIGMOID, weighting=Weighting.UNIT)

    def expert_forward(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        logit = F.linear(x, block.router.weight[expert : expert + 1])
        scaled = x * torch.sigmoid(logit.float()).to(logit.dtype)
        experts = block.experts
        gate, up = (scaled @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return (up * experts.act_fn(gate)) @ experts.down_proj[expert]

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return block.shared_expert(x)
