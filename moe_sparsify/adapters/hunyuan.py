"""Hunyuan-A13B (`hunyuan_v1_moe`, transformers 5.x).

From models/hunyuan_v1_moe/modeling_hunyuan_v1_moe.py: the router is
`mlp.gate.wg` (a float32 nn.Linear); float32 softmax over all experts, top-k
(`moe_topk`), divided by their sum, cast to the logits dtype. Every layer is
MoE and adds `shared_mlp` ungated. The config may give `num_experts` and
`moe_topk` per layer, but the experts module reads one count for all layers,
so per-layer lists are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from .base import MoEAdapter


class HunyuanMoeAdapter(MoEAdapter):
    model_types = ("hunyuan_v1_moe",)
    expert_count_keys = ("num_experts",)

    def __init__(self, config):
        super().__init__(config)
        if isinstance(config.num_experts, list) or isinstance(config.moe_topk, list):
            raise UsageError("hunyuan_v1_moe with per-layer num_experts or moe_topk lists is not supported")

    @property
    def top_k(self) -> int:
        return self.config.moe_topk

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return block.gate.wg.weight

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = block.gate.wg.weight
        return torch.nn.functional.linear(x.float() if weight.dtype == torch.float32 else x, weight)

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return block.shared_mlp(x)
