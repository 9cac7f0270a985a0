"""What moe-sparsify needs to know about one MoE family.

An adapter finds the MoE blocks, reproduces the block's routing exactly
(`router_logits` + a `RoutingSpec`), evaluates one expert on chosen tokens,
and says how checkpoint tensors and config keys change when experts go.
Everything model-independent (scoring subsets, searching) lives elsewhere.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..routing import RoutingSpec, route, skip_keep_mask, skipped_weights


@dataclass(frozen=True)
class TensorRule:
    """How one checkpoint tensor changes when a layer keeps some experts.

    kind: "expert" (one tensor per expert: drop or renumber), "stacked"
    (experts along dim 0: gather kept rows), "router" (rows per expert: gather).
    """

    kind: str
    layer: int
    expert: int | None = None
    # Per-expert tensors are named head + expert id + tail.
    head: str = ""
    tail: str = ""

    def renamed(self, new_expert: int) -> str:
        return f"{self.head}{new_expert}{self.tail}"


class MoEAdapter:
    model_types: ClassVar[tuple[str, ...]] = ()
    # Config keys that hold the routed-expert count, all rewritten on export.
    expert_count_keys: ClassVar[tuple[str, ...]] = ()
    per_expert_pattern: ClassVar[re.Pattern] = re.compile(
        r"^(?P<head>.*\.layers\.(?P<layer>\d+)\..*\.experts\.)(?P<expert>\d+)(?P<tail>\..+)$"
    )
    stacked_pattern: ClassVar[re.Pattern]
    router_pattern: ClassVar[re.Pattern]

    def __init__(self, config):
        self.config = config

    # --- structure -----------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return getattr(self.config, self.expert_count_keys[0])

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def routing(self) -> RoutingSpec:
        raise NotImplementedError

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        raise NotImplementedError

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the model does after its last decoder layer."""
        return model.lm_head(model.model.norm(hidden))

    def moe_layers(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.decoder_layers(model)) if self.moe_block(layer) is not None]

    # --- exact routed forward --------------------------------------------------------------------
    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_forward(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        raise NotImplementedError

    def routed_forward(
        self, block: nn.Module, hidden: torch.Tensor, keep: torch.Tensor | None, skip: tuple[float, str] | None = None
    ) -> torch.Tensor:
        """The block's output with only `keep` experts present (what the pruned checkpoint computes), and
        with skip = (beta, rule) the skipped pairs' weights zeroed and the rest renormalised as the model does.
        The reference for both pruning and skipping: every routed pair is computed."""
        x = hidden.reshape(-1, hidden.shape[-1])
        weights, indices = route(self.router_logits(block, x), self.routing, keep)
        if skip is not None:
            survivors = skip_keep_mask(weights, *skip)
            weights = skipped_weights(weights, survivors, self.routing.renormalize)
        out = torch.zeros_like(x)
        for expert in indices.unique().tolist():
            token, slot = torch.nonzero(indices == expert, as_tuple=True)
            contribution = self.expert_forward(block, x[token], expert) * weights[token, slot, None]
            out.index_add_(0, token, contribution.to(out.dtype))
        return out.reshape(hidden.shape)

    @contextmanager
    def pruned_view(
        self, model: nn.Module, kept: dict[int, list[int]], skip: dict[int, tuple[float, str]] | None = None
    ):
        """Temporarily route each listed layer as if only its kept experts existed (and, for layers in
        `skip`, with dynamic skipping applied), through the reference `routed_forward`."""
        layers = self.decoder_layers(model)
        skip = skip or {}
        originals = []
        try:
            for index in sorted(set(kept) | set(skip)):
                block = self.moe_block(layers[index])
                keep = torch.zeros(self.num_experts, dtype=torch.bool)
                keep[kept.get(index, list(range(self.num_experts)))] = True
                originals.append((block, block.forward))
                block.forward = self._masked_forward(block, keep, skip.get(index))
            yield model
        finally:
            for block, forward in reversed(originals):
                block.forward = forward

    def _masked_forward(self, block, keep, skip):
        def forward(hidden_states, *args, **kwargs):
            return self.routed_forward(block, hidden_states, keep.to(hidden_states.device), skip)

        return forward

    # --- checkpoint --------------------------------------------------------------------------------
    def tensor_rule(self, name: str) -> TensorRule | None:
        if m := self.per_expert_pattern.match(name):
            return TensorRule("expert", int(m["layer"]), int(m["expert"]), head=m["head"], tail=m["tail"])
        if m := self.stacked_pattern.match(name):
            return TensorRule("stacked", int(m["layer"]))
        if m := self.router_pattern.match(name):
            return TensorRule("router", int(m["layer"]))
        return None

    def pruned_config(self, config: dict, keep: int) -> list[str]:
        """Rewrite the expert count in a config.json dict; returns 'key: old -> new' lines."""
        changes = []
        for key in self.expert_count_keys:
            if key in config:
                changes.append(f"{key}: {config[key]} -> {keep}")
                config[key] = keep
        return changes

    def router_fingerprint(self, model: nn.Module, kept: dict[int, list[int]] | None = None) -> str:
        """sha256 of the router weights in float32: of `model`, or of the model `kept` would export."""
        digest = hashlib.sha256()
        for index in self.moe_layers(model):
            weight = self.router_weight(self.moe_block(self.decoder_layers(model)[index])).detach().float().cpu()
            if kept and index in kept:
                weight = weight[kept[index]]
            digest.update(weight.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        raise NotImplementedError
