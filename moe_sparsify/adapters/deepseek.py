"""DeepSeek-V2 and DeepSeek-V3 (transformers 5.x).

From models/deepseek_v{2,3}/modeling_*.py, router `mlp.gate` (fp32 weight):
  V2: fp32 logits, softmax over all experts, top-k ("greedy"), weights are the
      probabilities times `routed_scaling_factor`, never renormalised.
  V3: fp32 logits, sigmoid; experts are chosen by sigmoid + `e_score_correction_bias`
      but weighted by the plain sigmoid, renormalised if `norm_topk_prob`, times
      `routed_scaling_factor`.
Dense first layers (`first_k_dense_replace`, `mlp_layer_types`) have no
experts; the shared experts are added ungated and never pruned.

Families carrying DeepSeek-V3's router code verbatim: dots1, dots3, GLM-4.5
(`glm4_moe`), GLM-4.7-Flash (`glm4_moe_lite`), GLM-4.5V's language model,
DeepSeek-V3.2, Sarvam-MLA, Solar-Open, and below, each with what differs:
EXAONE-MoE (bias beside the router on disk), MiMo-V2-Flash (no shared
experts), Kimi-Linear, Sarvam-MoE and Bailing-Hybrid (loaders that split or
concatenate tensors: no streaming), Nemotron-H (`mixer` block, latent
projections), GLM-5 and HY-V4 (indexer top-k carried between layers), Beam
(routed sum scaled in the block, soft-capped logits) and Mistral 4 (softmax
scores into the group rule).

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

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..routing import GroupLimit, GroupScore, RoutingSpec, Scoring, Weighting
from .base import MoEAdapter


class DeepseekAdapter(MoEAdapter):
    # dots1 and GLM-4-MoE route exactly like DeepSeek-V3 (tested from their config classes).
    model_types = (
        "deepseek_v3",
        "deepseek_v32",
        "dots1",
        "dots3_note_text",
        "glm4_moe",
        "glm4_moe_lite",
        "glm4v_moe_text",
        "sarvam_mla",
        "solar_open",
    )
    expert_count_keys = ("n_routed_experts", "num_experts")

    router_in_float32 = True
    scoring: ClassVar[Scoring] = Scoring.SIGMOID

    @property
    def routing(self) -> RoutingSpec:
        config = self.config
        return RoutingSpec(
            self.top_k,
            self.scoring,
            Weighting.renormalized_if(config.norm_topk_prob),
            scale=config.routed_scaling_factor,
            group_limit=GroupLimit.of(config.n_group, config.topk_group, GroupScore.TOP2),
        )

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        return getattr(block.gate, "e_score_correction_bias", None)

    def pruned_config(self, config: dict, keep: int) -> list[str]:
        changes = super().pruned_config(config, keep)
        if self.routing.grouped:  # the groups stay, each one smaller
            return changes
        for key in ("n_group", "num_expert_group", "topk_group"):  # Kimi-Linear writes num_expert_group
            if config.get(key) not in (None, 1):
                changes.append(f"{key}: {config[key]} -> 1")
                config[key] = 1
        return changes


class DeepseekV2Adapter(DeepseekAdapter):
    """DeepSeek-V2: a softmax over all experts, not renormalised, scaled; groups only with
    `topk_method: group_limited_greedy`, ranked by their best expert."""

    model_types = ("deepseek_v2",)

    @property
    def routing(self) -> RoutingSpec:
        config = self.config
        limit = None
        if getattr(config, "topk_method", "greedy") == "group_limited_greedy":
            limit = GroupLimit.of(config.n_group, config.topk_group, GroupScore.MAX)
        return RoutingSpec(
            self.top_k, weighting=Weighting.SCORES, scale=config.routed_scaling_factor, group_limit=limit
        )


class ExaoneMoeAdapter(DeepseekAdapter):
    model_types = ("exaone_moe",)
    checkpoint_renames = ((".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),)


class MimoV2FlashAdapter(DeepseekAdapter):
    model_types = ("mimo_v2_flash",)
    checkpoint_renames = ((".self_attn.attention_sink_bias", ".self_attn.sinks"),)


class KimiLinearAdapter(DeepseekAdapter):
    # Kimi-Linear's q/k/v convolutions, and Sarvam-MoE's and Bailing-Hybrid's fused attention
    # projections, are split or concatenated on load, not renamed: no layer streaming.
    model_types = ("kimi_linear", "sarvam_moe", "bailing_hybrid")
    streamable = False


class NemotronHAdapter(DeepseekAdapter):
    """Nemotron-H: the MoE block is the layer's `mixer`; experts are not gated (relu^2 on `up_proj`),
    optionally between latent projections: out = fc2(sum_i w_i E_i(fc1 x)) + shared(x). fc2 is linear,
    so each expert's output is W2 E_i(fc1 x) and fc2's bias goes with the shared part. The final norm
    is `norm_f`; on disk the prefix is `backbone.`, so no layer streaming."""

    model_types = ("nemotron_h",)
    block_attr = "mixer"
    streamable = False

    def expert_forward(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        out = super().expert_forward(block, block.fc1_latent_proj(x), expert)
        fc2 = block.fc2_latent_proj
        return F.linear(out, fc2.weight) if isinstance(fc2, nn.Linear) else out

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        bias = getattr(block.fc2_latent_proj, "bias", None)
        shared = block.shared_experts(x)
        return shared if bias is None else shared + bias

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm_f(hidden))


class Mistral4Adapter(DeepseekAdapter):
    """Mistral 4 (`mistral4`, loaded by AutoModelForImageTextToText as Mistral4ForCausalLM): DeepSeek-V3's
    block, but the router's float softmax (not sigmoid, no correction bias) feeds the group rule
    (groups ranked by their two best probabilities; excluded groups filled with 0, below any
    probability) and the weights, renormalised if `norm_topk_prob`, times `routed_scaling_factor`."""

    model_types = ("mistral4",)
    scoring = Scoring.SOFTMAX
    router_in_float32 = False  # its router is a bias-free linear in the model's dtype


class GlmMoeDsaAdapter(DeepseekAdapter):
    """GLM-5 (`glm_moe_dsa`): DeepSeek-V3's router; each decoder layer returns (hidden states, its
    attention indexer's top-k) and the model hands the latter to the next layer as
    `prev_topk_indices`, which layer-by-layer propagation carries along."""

    model_types = ("glm_moe_dsa",)
    carried_kwarg = "prev_topk_indices"


class HYV4Adapter(GlmMoeDsaAdapter):
    """HY-V4 (`hy_v4`): GLM-5's layout (DeepSeek-V3's router, indexer top-k handed between layers) with
    hyper-connection streams between decoder layers (the MoE block sees them collapsed), a clamped
    SwiGLU in the experts' `_apply_gate`, and a head of hc_head -> norm -> float32 lm_head."""

    model_types = ("hy_v4",)
    streamable = False  # attention sinks, gates and hyper-connection tensors are renamed on load

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        text = self.text_model(model)
        return model.lm_head(text.norm(text.hc_head(hidden)).to(model.lm_head.weight.dtype))


class Axk2Adapter(DeepseekAdapter):
    """AXK2 (`axk2`): DeepSeek-V3.2's block. Without groups (`n_group` unset, the released default) its
    router is DeepSeek-V3's. With groups it fills the excluded groups' choice scores with 0.0 instead
    of -inf, so a token whose biased scores are negative picks excluded experts: not a rule the
    search models, refused. Its gated norms are renamed on load: no streaming."""

    model_types = ("axk2",)
    streamable = False

    def __init__(self, config):
        super().__init__(config)
        if self.routing.grouped:
            raise UsageError(
                "axk2 with group-limited routing is not supported: it fills excluded groups with 0.0, not -inf, "
                "so negative biased scores lose to excluded experts"
            )


class BeamAdapter(DeepseekAdapter):
    model_types = ("beam",)

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().final_logits(model, hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
