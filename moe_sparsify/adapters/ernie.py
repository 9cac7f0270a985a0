"""ERNIE-4.5-MoE (`ernie4_5_moe`, transformers 5.x).

From models/ernie4_5_moe/modeling_ernie4_5_moe.py: float32 logits and softmax
over all experts; experts are chosen by probability + `e_score_correction_bias`
(held 1 x n in `gate.moe_statics`, beside the block on disk), weighted by the
plain probabilities divided by max(their sum, `moe_norm_min`): a softmax top-k
sum is at least k/n, far above the 1e-12 floor, so that is renormalisation.
The pruned model's softmax runs over the kept experts only, so the bias weighs
more against the rescaled probabilities and the ranking depends on the kept
set (Ranking.BIASED_SOFTMAX; the objective's candidates allow for it).
The optional `shared_experts` are added ungated. MoE layers follow
`moe_layer_start_index`, `moe_layer_end_index` and `moe_layer_interval`; the
others have no experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import Ranking, RoutingSpec
from .base import MoEAdapter


class ErnieMoeAdapter(MoEAdapter):
    model_types = ("ernie4_5_moe",)
    expert_count_keys = ("moe_num_experts",)
    checkpoint_renames = ((".mlp.moe_statics.", ".mlp.gate.moe_statics."),)
    router_in_float32 = True

    @property
    def top_k(self) -> int:
        return self.config.moe_k

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(top_k=self.top_k, ranking=Ranking.BIASED_SOFTMAX)

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return block.gate.moe_statics.e_score_correction_bias.squeeze(0)
