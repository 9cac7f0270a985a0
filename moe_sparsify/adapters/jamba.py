"""Jamba (transformers 5.x): Mamba/attention hybrid with MoE feed-forwards.

From models/jamba/modeling_jamba.py: the MoE block is `feed_forward` on the
layers where i % expert_layer_period == expert_layer_offset (the others hold a
dense JambaMLP); its router (`router`, no bias) takes a float32 softmax over
all experts and the top-k, never renormalised, cast to the model dtype. No
shared expert. The final norm is `model.final_layernorm`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import RoutingSpec, Weighting
from .base import MoEAdapter


class JambaAdapter(MoEAdapter):
    model_types = ("jamba",)
    expert_count_keys = ("num_experts",)
    block_attr = "feed_forward"
    router_attr = "router"

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(top_k=self.top_k, weighting=Weighting.SCORES)

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.final_layernorm(hidden))
