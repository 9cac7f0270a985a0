"""Qwen2-MoE, Qwen3-MoE, OLMoE and their kin (transformers 5.x): one router, several configs.

From models/{qwen2_moe,qwen3_moe,olmoe}/modeling_*.py: the router (`mlp.gate`,
no bias) takes `F.linear(x, weight)`, a float32 softmax over all experts,
top-k, divides by the top-k sum only if `norm_topk_prob` (default False), and
casts the weights to the model dtype. Without renormalisation a token's
weights depend on every kept expert's logit, which the objective handles with
the kept logsumexp. Dense layers (`mlp_only_layers`, `decoder_sparse_step`)
have no `experts` and are skipped. Qwen2-MoE adds a shared expert scaled by
`sigmoid(shared_expert_gate(x))`; it is never pruned.

Mellum's router and block are Qwen3-MoE's; Qwen3-Next's are Qwen2-MoE's;
Qwen3.5-MoE's too, except that it always renormalises (no `norm_topk_prob`);
Qwen3-VL-MoE's language model (`qwen3_vl_moe_text`) is Qwen3-MoE's, always renormalised.
LaraMini (softmax) and Flint (sigmoid, no bias) add their `shared_expert` in
full, without a gate, and renormalise if `norm_topk_prob`.

Config keys: Qwen2-MoE stores `num_experts`; Qwen3-MoE stores `num_local_experts`
(an attribute map) while transformers 4.x read `num_experts`, so both are
written; OLMoE stores `num_experts` (alias `num_local_experts`), both written.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..routing import RoutingSpec, Scoring, Weighting
from .base import MoEAdapter


class QwenMoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe", "olmoe", "flex_olmo", "mellum")
    expert_count_keys = ("num_experts", "num_local_experts")
    always_written_keys = ("num_experts", "num_local_experts")

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(top_k=self.top_k, weighting=Weighting.renormalized_if(self.renormalizes))

    @property
    def renormalizes(self) -> bool:
        return bool(self.config.norm_topk_prob)


class Qwen2MoeAdapter(QwenMoeAdapter):
    model_types = ("qwen2_moe", "qwen3_next")
    expert_count_keys = ("num_experts",)
    always_written_keys = ()

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


class Qwen35MoeAdapter(Qwen2MoeAdapter):
    model_types = ("qwen3_5_moe_text",)

    renormalizes = True  # always: its config has no norm_topk_prob


class Qwen3VLMoeAdapter(MoEAdapter):
    model_types = ("qwen3_vl_moe_text",)
    expert_count_keys = ("num_experts",)


class Qwen4ExpAdapter(Qwen2MoeAdapter):
    """Qwen4-Exp (`qwen4_exp_text`): Qwen2-MoE's router and block inside a residual stream of
    `hc_count` hyper-connection copies (the block sees them mixed down); the head reads
    `hyper_connection_mixer(h)` and has no final norm."""

    model_types = ("qwen4_exp_text",)

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(self.text_model(model).hyper_connection_mixer(hidden))


class UngatedSharedExpertAdapter(MoEAdapter):
    model_types = ("lara_mini",)
    expert_count_keys = ("num_experts",)

    scoring: ClassVar[Scoring] = Scoring.SOFTMAX

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(self.top_k, self.scoring, Weighting.renormalized_if(self.config.norm_topk_prob))

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return block.shared_expert(x)


class FlintAdapter(UngatedSharedExpertAdapter):
    model_types = ("flint",)
    scoring = Scoring.SIGMOID
    checkpoint_renames = ((".self_attn.softmax_offset", ".self_attn.sinks"),)
