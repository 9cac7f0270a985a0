"""The router-threshold file and how its per-layer betas are calibrated.

Its own versioned file (not config.json): rule, statistic, per-layer beta and
the skip fraction measured on calibration tokens, the calibration manifest,
and a fingerprint of the model it belongs to (architecture, expert count per
MoE layer, top-k, sha256 of the router weights), so that applying it to
another model, pruned differently or not at all, fails with a clear message.

Calibrating beta per layer from the top-k weights of calibration tokens:
  --quantile q   ratio rule: beta = q-quantile of w_2 / w_1 (q = 0.5 is the
                 paper: about half the tokens drop their second expert);
                 tail rule: beta = q-quantile of the tail left by dropping only
                 the last expert, (w_k / sum w), so about a fraction q of tokens
                 drop at least one expert.
  --target-skip f  the beta whose share of skipped (token, expert) pairs on
                 the calibration tokens is closest to f from below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import StrictFloat, StrictInt, StrictStr, with_config
from torch import nn

from .adapters import MoEAdapter
from .calibration.propagate import propagate
from .choices import SKIP_RULES, STATISTICS
from .errors import UsageError
from .files import DOCUMENT_CONFIG, Document
from .skip_rules import check_skip_rule, default_skip_rule, skip_keep_mask

KIND = "moe-sparsify-thresholds"
SCHEMA_VERSION = 1


@with_config(DOCUMENT_CONFIG)
@dataclass
class Fingerprint:
    model_type: StrictStr
    num_experts: list[StrictInt]  # per MoE layer
    top_k: StrictInt
    router_sha256: StrictStr
    router_dtype: StrictStr | None = None  # absent from files written before: then the hash alone decides
    router_norms: list[list[StrictFloat]] | None = None


@with_config(DOCUMENT_CONFIG)
@dataclass
class LayerThreshold:
    layer: StrictInt
    beta: StrictFloat
    skip_fraction: StrictFloat  # share of routed (token, expert) pairs skipped on the calibration tokens


@dataclass
class SkipThresholds(Document):
    WHAT: ClassVar[str] = "thresholds file"
    REMEDY: ClassVar[str] = "pass the file written by skip-profile"

    model: Fingerprint
    rule: StrictStr
    statistic: dict  # {"kind": "quantile" | "target_skip", "value": float}
    layers: list[LayerThreshold]
    calibration: dict = field(default_factory=dict)
    kind: StrictStr = KIND
    schema_version: StrictInt = SCHEMA_VERSION

    def structure_errors(self) -> list[str]:
        """One threshold per MoE layer of the fingerprint, each a share in [0, 1]; a known rule and statistic."""
        errors = []
        if self.rule not in SKIP_RULES:
            errors.append(f"rule {self.rule!r} is not one of {', '.join(SKIP_RULES)}")
        kind, value = self.statistic.get("kind"), self.statistic.get("value")
        if kind not in STATISTICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"statistic {self.statistic!r} is not {{kind: {' or '.join(STATISTICS)}, value: a number}}")
        seen = [entry.layer for entry in self.layers]
        if not seen:
            errors.append("it lists no layers")
        elif len(set(seen)) != len(seen):
            errors.append(f"layers {seen} name a layer more than once")
        elif len(seen) != len(self.model.num_experts):
            errors.append(f"it lists {len(seen)} layers, and its model has {len(self.model.num_experts)} MoE layers")
        for entry in self.layers:
            for name in ("beta", "skip_fraction"):
                if not 0.0 <= getattr(entry, name) <= 1.0:
                    errors.append(f"layer {entry.layer}: {name} {getattr(entry, name)} is not in [0, 1]")
        return errors

    def check_matches(self, fingerprint: Fingerprint, moe_layers: list[int] | None = None) -> None:
        """Refuse thresholds profiled on another model, or naming layers that are not its MoE layers."""
        self.check_same_model(self.model, fingerprint, "run skip-profile on this model")
        if moe_layers is not None and sorted(e.layer for e in self.layers) != sorted(moe_layers):
            raise UsageError(
                f"this {self.WHAT} names layers {[e.layer for e in self.layers]}, and the model's MoE layers are "
                f"{sorted(moe_layers)}; run skip-profile on this model"
            )


def load_thresholds(path: Path) -> SkipThresholds:
    return SkipThresholds.load(path)


def model_fingerprint(model: nn.Module, adapter: MoEAdapter, kept: dict[int, list[int]] | None = None) -> Fingerprint:
    """Fingerprint of `model`, or of the model `kept` would export (its router rows sliced)."""
    kept = kept or {}
    counts = [len(kept[i]) if i in kept else adapter.num_experts for i in adapter.moe_layers(model)]
    return Fingerprint(adapter.config.model_type, counts, adapter.top_k, *adapter.router_fingerprint(model, kept))


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile in float64 (torch.quantile caps its input size)."""
    ordered = values.double().flatten().sort().values
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).item()


def skip_fraction(weights: torch.Tensor, beta: float, rule: str) -> float:
    return 1.0 - skip_keep_mask(weights, beta, rule).double().mean().item()


def layer_beta(weights: torch.Tensor, rule: str, statistic: dict) -> float:
    """weights: tokens x k routing weights of one layer's calibration tokens."""
    ranked = weights.float().sort(dim=-1, descending=True).values
    if statistic["kind"] == "quantile":
        if rule == "ratio":
            return _quantile(ranked[:, 1] / ranked[:, 0], statistic["value"])
        return _quantile(ranked[:, -1] / ranked.sum(-1), statistic["value"])
    target = statistic["value"]
    # The skipped share grows with beta; bisect on [0, 1] for the largest beta not above the target.
    low, high = 0.0, 1.0
    if skip_fraction(weights, high, rule) <= target:
        return high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if skip_fraction(weights, mid, rule) <= target else (low, mid)
    return low


def profile(
    routing_weights: dict[int, torch.Tensor], rule: str | None, statistic: dict, top_k: int
) -> tuple[str, list[LayerThreshold]]:
    rule = check_skip_rule(rule or default_skip_rule(top_k), top_k)
    layers = []
    for index, weights in sorted(routing_weights.items()):
        beta = layer_beta(weights, rule, statistic)
        layers.append(LayerThreshold(index, beta, skip_fraction(weights, beta, rule)))
    return rule, layers


@torch.no_grad()
def routing_weights(
    model: nn.Module,
    adapter: MoEAdapter,
    token_ids: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    kept: dict[int, list[int]] | None = None,
    progress=None,
) -> dict[int, torch.Tensor]:
    """Per MoE layer, the top-k routing weights of every calibration token (tokens x k, float32).

    With `kept`, the weights of the pruned model: each layer routes among its kept experts and
    feeds the next layer the pruned layer's outputs.
    """
    kept = kept or {}
    weights: dict[int, torch.Tensor] = {}

    def on_layer(step):
        index, block = step.index, step.block
        keep = None
        if index in kept:
            keep = torch.zeros(adapter.num_experts, dtype=torch.bool, device=device)
            keep[kept[index]] = True
        weights[index] = torch.cat([adapter.route(block, x.to(device), keep)[0].cpu() for x in step.inputs])
        return kept.get(index)

    propagate(model, adapter, token_ids, on_layer, batch_size=batch_size, device=device, progress=progress)
    return weights
