"""MiniMax-M2 and Hunyuan-V3 (transformers 5.x): sigmoid scores, a block-level correction bias.

From models/minimax_m2 and models/hy_v3: the block passes its own
`e_score_correction_bias` to the router, which takes float32 sigmoid scores,
chooses the top-k of scores + bias, weights them by the plain scores divided by
their sum (HY-V3 adds 1e-20 and multiplies by `router_scaling_factor`). Dense
layers (HY-V3's `mlp_layer_types`) have no experts. HY-V3 adds its
`shared_experts` ungated (in float32 when `enable_moe_fp32_combine`); MiniMax-M2
has none. On disk MiniMax-M2 keeps Mixtral's layout (`block_sparse_moe`,
w1/w2/w3); HY-V3 names the router `router.gate`, the bias `expert_bias` and
the shared experts `shared_mlp`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import RoutingSpec
from .base import MoEAdapter


class BiasedSigmoidAdapter(MoEAdapter):
    model_types = ("minimax_m2",)
    expert_count_keys = ("num_local_experts",)

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(
            self.top_k, "sigmoid", renormalize=True, scale=getattr(self.config, "router_scaling_factor", 1.0)
        )

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return block.e_score_correction_bias


class HunyuanV3Adapter(BiasedSigmoidAdapter):
    model_types = ("hy_v3",)
    expert_count_keys = ("num_experts",)
    checkpoint_renames = (
        (".mlp.router.gate.", ".mlp.gate."),
        (".mlp.expert_bias", ".mlp.e_score_correction_bias"),
        (".mlp.shared_mlp.", ".mlp.shared_experts."),
    )

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return block.shared_experts(x)
