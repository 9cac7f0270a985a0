"""Dynamic expert skipping that saves compute in stock transformers.

The rules (which of a token's routed pairs survive, and their weights) are in skip_rules.py.

Runtime: transformers 5.x dispatches every `@use_experts_implementation`
experts module through a registry of experts functions. `enable_skipping`
registers one more, "moe_sparsify_skip": it applies the rule to the router's
(index, weight) pairs, drops the skipped pairs, and hands only the surviving
(token, expert) pairs, one per row, to the implementation that was active
before (grouped_mm, batched_mm or eager), or, for decode-sized batches of plain
gated experts, computes them in a loop over the experts they use. Work therefore scales with the
pairs kept, in prefill, decode and `generate`, on any device, without a
patched modeling file and without sentinel expert ids (whose handling differs
between transformers releases).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import MoEAdapter, adapter_for
from .errors import UsageError
from .skip_rules import skip_keep_mask, skipped_weights
from .thresholds import SkipThresholds, load_thresholds, model_fingerprint

IMPLEMENTATION = "moe_sparsify_skip"
_STATE = "_moe_sparsify_skip"  # attribute on each experts module while skipping is on
_PREVIOUS = "_moe_sparsify_previous_experts_implementation"  # attribute on the model


# Up to this many surviving pairs (decode-sized batches), pairs are computed by a loop over the
# experts they use, reading each used expert's weights once with no sorting or grouped-matmul set-up;
# more pairs go to the implementation that was active before (grouped_mm on GPUs).
DIRECT_PAIRS = 64


@dataclass
class LayerSkip:
    """What one experts module needs while skipping is on, plus its counters."""

    beta: float
    rule: str
    renormalize: bool
    inner: str  # the experts implementation that computes the surviving pairs of large batches
    pairs: int = 0
    kept: int = 0


def _inner_forward(module: nn.Module, name: str):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if name == "eager":
        return type(module).forward.__wrapped__  # the modeling file's own loop, under the dispatch wrapper
    return ALL_EXPERTS_FUNCTIONS[name]


def _plain_gated(module: nn.Module) -> bool:
    """Fused gate/up and down tensors, no biases, no transposition: what the direct loop computes."""
    flags = ("has_bias", "is_transposed", "has_post_expert_norm")
    return getattr(module, "has_gate", False) and not any(getattr(module, f, False) for f in flags)


def _direct_pairs(module: nn.Module, hidden: torch.Tensor, token, expert, weight) -> torch.Tensor:
    """tokens x hidden float32 output from a few pairs: Python-level grouping (no sort, no set-up
    kernels), each used expert's weights read once."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    tokens, weight = token.tolist(), weight.float()
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(expert.tolist()):
        groups.setdefault(e, []).append(i)
    for e, pairs in groups.items():
        if len(pairs) == 1:
            (i,) = pairs
            h = module._apply_gate(F.linear(hidden[tokens[i]], module.gate_up_proj[e]))
            out[tokens[i]] += F.linear(h, module.down_proj[e]).float() * weight[i]
        else:
            rows = torch.tensor(pairs, device=hidden.device)
            h = module._apply_gate(F.linear(hidden[token[rows]], module.gate_up_proj[e]))
            out.index_add_(0, token[rows], F.linear(h, module.down_proj[e]).float() * weight[rows, None])
    return out


def skipping_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights):
    state: LayerSkip | None = getattr(self, _STATE, None)
    if state is None:  # a module skipping was not enabled for (e.g. added later): behave as before
        return _inner_forward(self, "grouped_mm")(self, hidden_states, top_k_index, top_k_weights)
    keep = skip_keep_mask(top_k_weights, state.beta, state.rule)
    weights = skipped_weights(top_k_weights, keep, state.renormalize).to(top_k_weights.dtype)
    token, slot = torch.nonzero(keep, as_tuple=True)
    state.pairs += keep.numel()
    state.kept += token.numel()
    expert, weight = top_k_index[token, slot], weights[token, slot]
    if token.numel() <= DIRECT_PAIRS and _plain_gated(self):
        return _direct_pairs(self, hidden_states, token, expert, weight).to(hidden_states.dtype)
    # One row per surviving pair, top-1 each: the inner implementation computes only these.
    pair_out = _inner_forward(self, state.inner)(self, hidden_states[token], expert[:, None], weight[:, None])
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, token, pair_out.float())
    return out.to(hidden_states.dtype)


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, skipping_experts_forward)


def _adapter_of(model: nn.Module) -> MoEAdapter:
    return adapter_for(model.config)


def check_skipping_supported(adapter: MoEAdapter) -> None:
    if not adapter.supports_skipping:
        raise UsageError(
            f"dynamic skipping is not available for {adapter.config.model_type}: its experts do not use "
            "transformers' experts interface; prune it without skipping"
        )


def enable_skipping(model: nn.Module, thresholds, adapter: MoEAdapter | None = None) -> None:
    """Switch every MoE block of `model` to skipping with per-layer thresholds.

    thresholds: a `SkipThresholds` (or a path to its file); it must belong to this model.
    """
    if not isinstance(thresholds, SkipThresholds):
        thresholds = load_thresholds(thresholds)
    adapter = adapter or _adapter_of(model)
    check_skipping_supported(adapter)
    thresholds.check_matches(model_fingerprint(model, adapter), adapter.moe_layers(model))
    _register()
    current = model.config._experts_implementation
    previous = getattr(model, _PREVIOUS, current if current != IMPLEMENTATION else "grouped_mm")
    layers = adapter.decoder_layers(model)
    for entry in thresholds.layers:
        experts = adapter.moe_block(layers[entry.layer]).experts
        setattr(experts, _STATE, LayerSkip(entry.beta, thresholds.rule, adapter.routing.renormalizes, previous))
    setattr(model, _PREVIOUS, previous)
    model.set_experts_implementation(IMPLEMENTATION)


def disable_skipping(model: nn.Module, adapter: MoEAdapter | None = None) -> None:
    adapter = adapter or _adapter_of(model)
    if not hasattr(model, _PREVIOUS):
        return
    model.set_experts_implementation(getattr(model, _PREVIOUS))
    delattr(model, _PREVIOUS)
    for index in adapter.moe_layers(model):
        experts = adapter.moe_block(adapter.decoder_layers(model)[index]).experts
        if hasattr(experts, _STATE):
            delattr(experts, _STATE)


@contextmanager
def skipping(model: nn.Module, thresholds, adapter: MoEAdapter | None = None):
    """`enable_skipping` for the duration of a `with` block (no-op when thresholds is None)."""
    if thresholds is None:
        yield model
        return
    enable_skipping(model, thresholds, adapter)
    try:
        yield model
    finally:
        disable_skipping(model, adapter)


def skip_fractions(model: nn.Module, adapter: MoEAdapter | None = None) -> dict[int, float]:
    """Share of routed (token, expert) pairs skipped per layer since skipping was enabled."""
    adapter = adapter or _adapter_of(model)
    fractions = {}
    for index in adapter.moe_layers(model):
        state = getattr(adapter.moe_block(adapter.decoder_layers(model)[index]).experts, _STATE, None)
        if state is not None and state.pairs:
            fractions[index] = 1.0 - state.kept / state.pairs
    return fractions
