"""DeepSeek-V2 and DeepSeek-V3 (transformers 5.x).

From models/deepseek_v{2,3}/modeling_*.py, router `mlp.gate` (fp32 weight):
  V2: fp32 logits, softmax over all experts, top-k ("greedy"), weights are the
      probabilities times `routed_scaling_factor`, never renormalised.
  V3: fp32 logits, sigmoid; experts are chosen by sigmoid + `e_score_correction_bias`
      but weighted by the plain sigmoid, renormalised if `norm_topk_prob`, times
      `routed_scaling_factor`.
Dense first layers (`first_k_dense_replace`) have no experts; the shared
experts are added ungated and never pruned.

Group-limited routing (V2 "group_limited_greedy", V3 with topk_group < n_group)
first picks the `topk_group` best groups of contiguous experts, by a score that
itself depends on which experts a group still has. Removing experts can then
move a token into another group, outside its original top-(k + n - r), so the
exact search's candidate bound fails, even when every group loses as many
experts. Such models are refused before any work. Where the group rule is
inactive (one group, or every group kept) routing is plain top-k: those
models are supported, and the export writes n_group = topk_group = 1, which
routes identically and keeps the group reshape valid for any kept count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..routing import RoutingSpec
from .base import MoEAdapter


class DeepseekAdapter(MoEAdapter):
    # dots1 and GLM-4-MoE route exactly like DeepSeek-V3 (tested from their config classes).
    model_types = ("deepseek_v2", "deepseek_v3", "dots1", "glm4_moe")
    expert_count_keys = ("n_routed_experts",)

    def __init__(self, config):
        super().__init__(config)
        groups, chosen = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
        grouped = config.model_type == "deepseek_v3" or getattr(config, "topk_method", "greedy") != "greedy"
        if grouped and groups > 1 and chosen < groups:
            raise UsageError(
                f"{config.model_type} with group-limited routing (n_group={groups}, topk_group={chosen}) is not "
                "supported: removing experts can change which groups a token is routed to, so the exact search "
                "does not hold; see moe_sparsify/adapters/deepseek.py"
            )

    @property
    def routing(self) -> RoutingSpec:
        if self.config.model_type == "deepseek_v2":
            return RoutingSpec(self.top_k, "softmax", renormalize=False, scale=self.config.routed_scaling_factor)
        return RoutingSpec(
            self.top_k, "sigmoid", renormalize=bool(self.config.norm_topk_prob), scale=self.config.routed_scaling_factor
        )

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), block.gate.weight.float())

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return getattr(block.gate, "e_score_correction_bias", None)

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return block.shared_experts(x)

    def pruned_config(self, config: dict, keep: int) -> list[str]:
        changes = super().pruned_config(config, keep)
        for key in ("n_group", "topk_group"):
            if config.get(key) not in (None, 1):
                changes.append(f"{key}: {config[key]} -> 1")
                config[key] = 1
        return changes
