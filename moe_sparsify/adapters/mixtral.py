"""Mixtral (transformers 5.x): softmax router, top-k renormalised, fused experts.

From models/mixtral/modeling_mixtral.py: the router computes `F.linear(x,
weight)`, a float32 softmax over all experts, top-k, and divides the top-k
weights by their sum; experts hold `gate_up_proj` (n, 2I, H; gate rows first)
and `down_proj` (n, H, I). Checkpoints on disk hold either those fused tensors
or the hub's per-expert `block_sparse_moe.experts.N.w{1,2,3}.weight`.
"""

from __future__ import annotations

from ..routing import RoutingSpec
from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    expert_count_keys = ("num_local_experts",)

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(top_k=self.top_k, scoring="softmax", renormalize=True)
