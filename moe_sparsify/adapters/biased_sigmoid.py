"""Sigmoid routers with a correction bias and no groups (transformers 5.x):
MiniMax-M2, HY-V3, AFMoE, Laguna, MiniMax-M3 (text), LFM2-MoE and Kolibri.

Each takes float32 sigmoid scores, chooses the top-k of scores + bias, and
weights the chosen experts by their plain scores divided by their sum (HY-V3
and AFMoE add 1e-20, below float32 resolution for any such sum), times a
family scale. Where the bias lives and what scales the weights:
  minimax_m2   block `e_score_correction_bias`, no scale, no shared experts
  hy_v3        block `e_score_correction_bias`, x `router_scaling_factor`, shared experts
  afmoe        block `expert_bias`, router linear at `router.gate`, x `route_scale`, shared experts
  laguna       `gate.e_score_correction_bias`; logits soft-capped first (tanh(l / c) c, a
               monotone map per expert, so pruning is unaffected); x `moe_routed_scaling_factor`
  minimax_m3_vl_text  `gate.e_score_correction_bias`, x `routed_scaling_factor`, shared experts
               with MiniMax's clamped gate (the experts' `_apply_gate`)
  lfm2_moe     block `expert_bias` (only if `use_expert_bias`), block at `feed_forward`,
               renormalised only if `norm_topk_prob`, by (sum + 1e-6), x `routed_scaling_factor`;
               sigmoid in the model dtype; final norm `embedding_norm`
  kolibri1     `gate.e_score_correction_bias` added to the float32 logits (not the scores)
               to choose; weights the sigmoid of the chosen logits, renormalised only if
               `norm_topk_prob`, no scale; shared experts; the bias is `moe.router.expert_bias`
               on disk
Shared experts are added ungated. On disk MiniMax-M2 keeps Mixtral's layout
(`block_sparse_moe`, w1/w2/w3); HY-V3 names the router `router.gate`, the bias
`expert_bias` and the shared experts `shared_mlp`; Laguna saves the bias as
`experts.e_score_correction_bias` and the shared experts as `shared_expert`.
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import Ranking, RoutingSpec, Scoring, Weighting
from .base import MoEAdapter, TensorRule


class BiasedSigmoidAdapter(MoEAdapter):
    expert_count_keys = ("num_local_experts",)
    bias_path: ClassVar[str] = "e_score_correction_bias"  # from the MoE block
    scale_key: ClassVar[str | None] = None  # config key of the weight scale

    @property
    def routing(self) -> RoutingSpec:
        scale = getattr(self.config, self.scale_key) if self.scale_key else 1.0
        return RoutingSpec(self.top_k, Scoring.SIGMOID, scale=scale)

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return attrgetter(self.bias_path)(block)


class MinimaxM2Adapter(BiasedSigmoidAdapter):
    model_types = ("minimax_m2",)
    # The hub's MiniMax-M2 keeps Mixtral's on-disk block name (transformers maps minimax_m2 to Mixtral's
    # conversion): `block_sparse_moe.{gate,experts,e_score_correction_bias}` load as `mlp.*`.
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)


class HunyuanV3Adapter(BiasedSigmoidAdapter):
    model_types = ("hy_v3",)
    expert_count_keys = ("num_experts",)
    scale_key = "router_scaling_factor"
    checkpoint_renames = (
        (".mlp.router.gate.", ".mlp.gate."),
        (".mlp.expert_bias", ".mlp.e_score_correction_bias"),
        (".mlp.shared_mlp.", ".mlp.shared_experts."),
    )


class AfmoeAdapter(BiasedSigmoidAdapter):
    model_types = ("afmoe",)
    expert_count_keys = ("num_experts",)
    bias_path = "expert_bias"
    scale_key = "route_scale"

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return block.router.gate.weight

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.router.gate(x).float()


class LagunaAdapter(BiasedSigmoidAdapter):
    model_types = ("laguna",)
    expert_count_keys = ("num_experts",)
    bias_path = "gate.e_score_correction_bias"
    scale_key = "moe_routed_scaling_factor"
    checkpoint_renames = (
        (".mlp.experts.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    )

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, block.gate.weight).float()
        cap = self.config.moe_router_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap and cap > 0 else logits


class MinimaxM3Adapter(BiasedSigmoidAdapter):
    model_types = ("minimax_m3_vl_text",)
    bias_path = "gate.e_score_correction_bias"
    scale_key = "routed_scaling_factor"


class Lfm2MoeAdapter(BiasedSigmoidAdapter):
    model_types = ("lfm2_moe",)
    expert_count_keys = ("num_experts",)
    block_attr = "feed_forward"
    bias_path = "expert_bias"
    scale_key = "routed_scaling_factor"

    @property
    def routing(self) -> RoutingSpec:
        weighting = Weighting.renormalized_if(self.config.norm_topk_prob)
        eps = 1e-6 if weighting is Weighting.RENORMALIZED else 0.0
        scale = self.config.routed_scaling_factor
        return RoutingSpec(self.top_k, Scoring.SIGMOID, weighting, scale=scale, renorm_eps=eps)

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return block.expert_bias if self.config.use_expert_bias else None

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.embedding_norm(hidden))


class KolibriAdapter(BiasedSigmoidAdapter):
    model_types = ("kolibri1",)
    expert_count_keys = ("num_local_experts", "num_experts")
    bias_path = "gate.e_score_correction_bias"
    router_in_float32 = True
    checkpoint_renames = (
        (".moe.router.expert_bias", ".mlp.gate.e_score_correction_bias"),
        (".post_attn_norm.", ".post_self_attn_layernorm."),
        (".post_ffn_norm.", ".post_mlp_layernorm."),
    )
    disk_bias_pattern: ClassVar[re.Pattern] = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.moe\.router\.expert_bias$")

    @property
    def routing(self) -> RoutingSpec:
        weighting = Weighting.renormalized_if(self.config.norm_topk_prob)
        return RoutingSpec(self.top_k, Scoring.SIGMOID, weighting, ranking=Ranking.LOGITS)

    def tensor_rule(self, name: str) -> TensorRule | None:
        if m := self.disk_bias_pattern.match(name):
            return TensorRule("router", int(m["layer"]))
        return super().tensor_rule(name)
