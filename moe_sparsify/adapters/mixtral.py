"""Mixtral, MiniMax and Granite-MoE (transformers 5.x): top-k renormalised softmax, fused experts.

From models/mixtral/modeling_mixtral.py (MiniMax's router is the same code):
the router computes `F.linear(x, weight)`, a float32 softmax over all
experts, top-k, and divides the top-k weights by their sum; experts hold
`gate_up_proj` (n, 2I, H; gate rows first) and `down_proj` (n, H, I).
Checkpoints on disk hold either those fused tensors or the hub's per-expert
`block_sparse_moe.experts.N.w{1,2,3}.weight`.

Granite-MoE (models/granitemoe*): the router takes top-k of the float32 logits
and a softmax over those k, the same weights. The block lives at
`block_sparse_moe` in memory too; on disk the experts are `input_linear` /
`output_linear` and the router `router.layer`. Logits are divided by
`logits_scaling`. GraniteMoeShared's `shared_mlp` sits beside the block in the
decoder layer, so it is neither pruned nor seen by the objective (the same in
GraniteMoeHybrid, whose mixers alternate Mamba-2 and attention).

Aria (text): top-k of the logits and a softmax over those k, with transposed
experts (`fc1`/`fc2` on disk) and shared experts added ungated; counts in
`moe_num_experts` / `moe_topk`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral", "minimax")
    expert_count_keys = ("num_local_experts",)
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)  # the hub's original layout


class GraniteMoeAdapter(MixtralAdapter):
    model_types = ("granitemoe", "granitemoeshared", "granitemoe_swa", "granitemoehybrid")
    block_attr = "block_sparse_moe"
    router_attr = "router"
    checkpoint_renames = (
        (".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
        (".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
        (".block_sparse_moe.router.layer.", ".block_sparse_moe.router."),
    )

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return super().final_logits(model, hidden) / self.config.logits_scaling


class AriaTextAdapter(MixtralAdapter):
    model_types = ("aria_text",)
    expert_count_keys = ("moe_num_experts",)
    router_attr = "router"
    checkpoint_renames = (
        (".mlp.experts.fc1.weight", ".mlp.experts.gate_up_proj"),
        (".mlp.experts.fc2.weight", ".mlp.experts.down_proj"),
    )

    @property
    def top_k(self) -> int:
        return self.config.moe_topk
