"""DeepSeek-V2 and DeepSeek-V3 (transformers 5.x).

From models/deepseek_v{2,3}/modeling_*.py, router `mlp.gate` (fp32 weight):
  V2: fp32 logits, softmax over all experts, top-k ("greedy"), weights are the
      probabilities times `routed_scaling_factor`, never renormalised.
  V3: fp32 logits, sigmoid; experts are chosen by sigmoid + `e_score_correction_bias`
      but weighted by the plain sigmoid, renormalised if `norm_topk_prob`, times
      `routed_scaling_factor`.
Dense first layers (`first_k_dense_replace`) have no experts; the shared
experts are added ungated and never pruned. EXAONE-MoE, Solar-Open and
MiMo-V2-Flash carry DeepSeek-V3's router code verbatim (MiMo without shared
experts); EXAONE keeps its correction bias beside the router on disk.

Group-limited routing (V2 "group_limited_greedy": groups ranked by their best
score; V3: by the sum of their two best choice scores) first picks each token's
`topk_group` best groups of contiguous experts, then its top-k among them.
Pruning keeps the same number of experts in every group, so the pruned model's
groups are the original groups minus the removed experts and its routing equals
the original's with those experts masked, exactly; the search's candidates are
every expert some allowed subset can route a token to (routing.candidate_experts).
Unequal removal is refused: the pruned model would regroup experts by position,
routing tokens in a way the original never did. Where the group rule is inactive
(one group, or every group chosen) routing is plain top-k, any kept count is
allowed, and the export writes n_group = topk_group = 1, which routes
identically and keeps the group reshape valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import RoutingSpec
from .base import MoEAdapter


class DeepseekAdapter(MoEAdapter):
    # dots1 and GLM-4-MoE route exactly like DeepSeek-V3 (tested from their config classes).
    model_types = ("deepseek_v2", "deepseek_v3", "dots1", "glm4_moe", "solar_open")
    expert_count_keys = ("n_routed_experts", "num_experts")

    @property
    def routing(self) -> RoutingSpec:
        config = self.config
        v2 = config.model_type == "deepseek_v2"
        groups = {}
        if not v2 or getattr(config, "topk_method", "greedy") == "group_limited_greedy":
            groups = dict(groups=config.n_group or 1, groups_chosen=config.topk_group or 1)
            groups["group_score"] = "max" if v2 else "top2"
        if v2:
            return RoutingSpec(self.top_k, "softmax", renormalize=False, scale=config.routed_scaling_factor, **groups)
        renormalize = bool(config.norm_topk_prob)
        return RoutingSpec(self.top_k, "sigmoid", renormalize, scale=config.routed_scaling_factor, **groups)

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), block.gate.weight.float())

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return getattr(block.gate, "e_score_correction_bias", None)

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        shared = getattr(block, "shared_experts", None)
        return None if shared is None else shared(x)

    def pruned_config(self, config: dict, keep: int) -> list[str]:
        changes = super().pruned_config(config, keep)
        if self.routing.grouped:  # the groups stay, each one smaller
            return changes
        for key in ("n_group", "topk_group"):
            if config.get(key) not in (None, 1):
                changes.append(f"{key}: {config[key]} -> 1")
                config[key] = 1
        return changes


class ExaoneMoeAdapter(DeepseekAdapter):
    model_types = ("exaone_moe",)
    checkpoint_renames = ((".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),)


class MimoV2FlashAdapter(DeepseekAdapter):
    model_types = ("mimo_v2_flash",)
    checkpoint_renames = ((".self_attn.attention_sink_bias", ".self_attn.sinks"),)
