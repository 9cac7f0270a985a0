"""The recovery's end-to-end guard: does a change to one layer bring the model's next-token
distributions closer to the original's, on calibration sequences the change was not fitted on?

A layer's recovery lowers that layer's own loss; that need not lower the divergence at the logits (a
measured case: a WikiText-2 model whose perplexity rose while every accepted change lowered its layer's
held-back loss). So after each method changes a layer, the held-back batches run from that layer's
inputs through every later decoder layer, the final norm and the head, with the layer pruned to its
kept experts as it now stands and the later layers as they are; the change is kept only where the mean
KL(original || pruned) per token falls. The original distributions come from the same batches at the
first MoE layer, before anything is changed: its final hidden states are held (tokens x hidden, not
tokens x vocabulary) and read through the head again at each comparison.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapters import MoEAdapter
from .calibration.propagate import LayerStep, Resident, run_cached
from .divergence import mean_divergence


class EndToEndGuard:
    """KL(original || pruned) on the batches `held` (indices into each step's batches)."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, device: torch.device, residency=None):
        self.model, self.adapter, self.device = model, adapter, device
        self.residency = residency or Resident(model, adapter)
        self.depth = len(adapter.decoder_layers(model))
        self.original: list[torch.Tensor] | None = None  # final hidden states of the original model

    def _final_states(self, step: LayerStep, held: range) -> list[torch.Tensor]:
        """Decoder layers step.index..end over the held batches; later layers visit the device one at a time."""
        chosen = [step.batches[i] for i in held]
        return run_cached(self.model, self.adapter, self.residency, chosen, step.index, self.depth, self.device)[0]

    def _divergence(self, states: list[torch.Tensor]) -> float:
        """Mean per-token KL over the batches, one batch's vocabulary-wide log-probabilities at a time."""
        total, count = 0.0, 0
        for original, pruned in zip(self.original, states, strict=True):
            p, q = (self.adapter.final_log_probs(self.model, h) for h in (original, pruned))
            tokens = p[..., 0].numel()
            total += mean_divergence([p], [q]) * tokens
            count += tokens
        return total / count

    def for_layer(self, step: LayerStep, kept: list[int], held: range) -> Callable[[], float]:
        """A judge of layer step.index as it stands now, pruned to `kept`: call it after each change.
        The first call of a run (the first MoE layer, nothing changed yet) takes the original's states."""
        if self.original is None:
            self.original = self._final_states(step, held)

        def judge() -> float:
            with torch.no_grad(), self.adapter.pruned_view(self.model, {step.index: kept}):
                return self._divergence(self._final_states(step, held))

        return judge
