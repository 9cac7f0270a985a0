"""DBRX (transformers 5.x).

From models/dbrx/modeling_dbrx.py: decoder blocks at `transformer.blocks`, the
MoE block at `ffn`, its router a bias-free linear at `ffn.router.layer`. The
weights are a softmax over all experts (in the logits dtype), top-k, divided
by their p-norm with p = `moe_normalize_expert_weights`: p = 1 is
renormalisation, None none; any other p is not a rule the objective knows and
is refused. Experts are flattened: `experts.mlp.{w1, v1, w2}` are each
(n x ffn_hidden_size, hidden), expert e owning rows e x ffn .. (e + 1) x ffn;
out = (act(x w1_e^T) * x v1_e^T) w2_e. Counts live in the nested
`ffn_config`. The experts bypass transformers' experts interface (no dynamic
skipping), and the layers' prefix is not `model.layers` (no streaming).
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..routing import RoutingSpec, Weighting
from .base import MoEAdapter, TensorRule


class DbrxAdapter(MoEAdapter):
    model_types = ("dbrx",)
    block_attr = "ffn"
    streamable = False
    supports_skipping = False
    flat_pattern: ClassVar[re.Pattern] = re.compile(r"^.*\.blocks\.(?P<layer>\d+)\.ffn\.experts\.mlp\.(?:w1|v1|w2)$")
    router_weight_pattern: ClassVar[re.Pattern] = re.compile(
        r"^.*\.blocks\.(?P<layer>\d+)\.ffn\.router\.layer\.weight$"
    )

    def __init__(self, config):
        super().__init__(config)
        p = config.ffn_config.moe_normalize_expert_weights
        if p not in (None, 1):
            raise UsageError(f"dbrx with moe_normalize_expert_weights={p} is not supported (only 1 or None)")

    @property
    def num_experts(self) -> int:
        return self.config.ffn_config.moe_num_experts

    @property
    def top_k(self) -> int:
        return self.config.ffn_config.moe_top_k

    @property
    def routing(self) -> RoutingSpec:
        renormalize = self.config.ffn_config.moe_normalize_expert_weights is not None
        return RoutingSpec(top_k=self.top_k, weighting=Weighting.renormalized_if(renormalize))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.blocks

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.transformer.norm_f(hidden))

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return block.router.layer.weight

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, block.router.layer.weight)

    def expert_forward(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        mlp, width = block.experts.mlp, self.config.ffn_config.ffn_hidden_size
        rows = slice(expert * width, (expert + 1) * width)
        hidden = mlp.activation_fn(x @ mlp.w1[rows].T) * (x @ mlp.v1[rows].T)
        return hidden @ mlp.w2[rows]

    def tensor_rule(self, name: str) -> TensorRule | None:
        if m := self.flat_pattern.match(name):
            return TensorRule("flat", int(m["layer"]), rows=self.config.ffn_config.ffn_hidden_size)
        if m := self.router_weight_pattern.match(name):
            return TensorRule("router", int(m["layer"]))
        return None

    def pruned_config(self, config: dict, keep: int) -> list[str]:
        ffn = config["ffn_config"]
        change = f"ffn_config.moe_num_experts: {ffn['moe_num_experts']} -> {keep}"
        ffn["moe_num_experts"] = keep
        return [change]
