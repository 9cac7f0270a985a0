"""Cohere2-MoE (`cohere2_moe`, transformers 5.x).

From models/cohere2_moe/modeling_cohere2_moe.py: top-k of the logits, then a
softmax over those k (`expert_selection_fn` "softmax": the renormalised top-k
of a softmax over all) or their sigmoid, divided by its sum if
`norm_topk_prob` ("sigmoid"). With `num_shared_experts` > 0 the shared experts
are added ("sum") or averaged with the routed output ("average": both halves
weighted 1/2, so routed weights scale by 0.5). Logits are multiplied by
`logit_scale`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..routing import RoutingSpec, Scoring, Weighting
from .base import MoEAdapter


class Cohere2MoeAdapter(MoEAdapter):
    model_types = ("cohere2_moe",)
    expert_count_keys = ("num_experts",)

    def __init__(self, config):
        super().__init__(config)
        if config.expert_selection_fn not in ("softmax", "sigmoid"):
            raise UsageError(f"cohere2_moe expert_selection_fn {config.expert_selection_fn!r} is not supported")
        if config.shared_expert_combination_strategy not in ("sum", "average"):
            raise UsageError("cohere2_moe shared_expert_combination_strategy must be sum or average")

    @property
    def _averaged(self) -> bool:
        return self.config.num_shared_experts > 0 and self.config.shared_expert_combination_strategy == "average"

    @property
    def routing(self) -> RoutingSpec:
        scale = 0.5 if self._averaged else 1.0
        if self.config.expert_selection_fn == "softmax":
            return RoutingSpec(top_k=self.top_k, scale=scale)
        return RoutingSpec(
            self.top_k, Scoring.SIGMOID, Weighting.renormalized_if(self.config.norm_topk_prob), scale=scale
        )

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if self.config.num_shared_experts == 0:
            return None
        shared = block.shared_experts(x)
        return shared / 2 if self._averaged else shared

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return super().final_logits(model, hidden) * model.logit_scale
