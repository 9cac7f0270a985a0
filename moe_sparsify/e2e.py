"""The e2e strategies' judge: a layer's shortlisted subsets scored by the divergence of the model's
next-token distributions from the original's (KL by default), on cached calibration activations.

`EndToEndRescorer.for_layer` scores a list of subsets at once (`search.Rescorer`); `rounds_for_layer`
scores them a calibration batch at a time, for racing the shortlist (`search.RoundScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import MoEAdapter
from .calibration.propagate import LayerStep, Resident, run_cached
from .distributed import gather_sequences, reduce_means, world
from .divergence import mean_divergence, sequence_divergences
from .errors import UsageError
from .search import Rescorer, RoundScorer


class EndToEndRescorer:
    """KL(original || pruned) of next-token distributions, for the e2e strategy.

    Runs on cached activations: at MoE layer l it takes the decoder-layer inputs of the first
    `samples` calibration sequences (whole batches), already produced by the pruned layers before l,
    and runs layers l..end, the final norm and the head, with layer l pruned to each candidate
    subset and the later layers as they are. The reference distribution is taken once, at the first
    MoE layer, before anything is pruned.

    horizon h: run only layer l and the h layers after it, then the final norm and the head on that
    hidden state (a logit lens), against the original model's hidden state at the same depth read the
    same way. Cost per subset: h + 1 layers instead of every later one. A horizon that reaches the
    last layer is exactly the above (None: always).

    logits_layers k: the first k MoE layers are read at the logits whatever the horizon; an early layer's
    error passes through every later one, which a short horizon misjudges most.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        samples: int,
        batch_size: int,
        device: torch.device,
        divergence: str = "kl",
        residency=None,
        horizon: int | None = None,
        logits_layers: int | None = None,
    ):
        self.model, self.adapter, self.device, self.divergence = model, adapter, device, divergence
        self.batch_size = batch_size
        self.residency = residency or Resident(model, adapter)
        self.depth = len(adapter.decoder_layers(model))
        # The depth (layers run) each MoE layer's divergence is read at: the logits for the first
        # `logits_layers` MoE layers, else `horizon` layers after it.
        moe_layers = adapter.moe_layers(model)
        at_logits = set(moe_layers[: logits_layers or 0])
        self.stops = {i: self.depth if i in at_logits else self._stop(i, horizon) for i in moe_layers}
        # One process scores the first ceil(samples / batch_size) whole batches. Under torchrun each rank
        # holds every world-th sequence, so its first batches/world batches make up the same sequences
        # only when the batches share out evenly; otherwise the ranks together would score more
        # sequences than one process and the plans would differ.
        whole, processes = -(-samples // batch_size), world()[1]
        if whole % processes:
            fits = -(-whole // processes) * processes * batch_size
            raise UsageError(
                f"e2e scores {whole} batch(es) of {batch_size} sequences, which {processes} processes cannot share "
                f"evenly (the plan would differ from one process's); set e2e_samples to {fits}"
            )
        self.batches = whole // processes
        # The original model's hidden states at each depth some layer is read at (taken at the first MoE
        # layer), and the reference log-probabilities of the current layer's depth.
        self.original: dict[int, list[torch.Tensor]] | None = None
        self.reference: tuple[int, list[torch.Tensor]] | None = None

    def _stop(self, index: int, horizon: int | None) -> int:
        return self.depth if horizon is None else min(self.depth, index + 1 + horizon)

    def _states(
        self, step, start: int, stop: int, also_at: set[int] = frozenset(), batches: slice | None = None
    ) -> tuple[list, dict]:
        """Layers start..stop-1 over the cached batches (those in `batches`: of the first self.batches), the
        later layers visiting the device one at a time; returns the states at `stop` and, by depth, those
        at the depths in `also_at`, kept in CPU memory: with a short horizon the original model's states
        are read at nearly every depth (at Mixtral-8x7B's shapes, 64 x 2048 tokens, ~1 GB each in bfloat16,
        ~31 GB for all), which the device need not hold beside the layers and activations."""
        chosen = step.batches[: self.batches][batches or slice(None)]
        return run_cached(
            self.model, self.adapter, self.residency, chosen, start, stop, self.device, also_at, torch.device("cpu")
        )

    def _log_probs(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.adapter.final_log_probs(self.model, h) for h in states]

    def _reference(self, step) -> tuple[int, list[torch.Tensor]]:
        """The depth layer `step.index` is read at and the original model's log-probabilities there."""
        stop = self.stops[step.index]
        if self.original is None:
            _, self.original = self._states(step, step.index, self.depth, set(self.stops.values()))
        # Only the depths this layer and the later ones are read at are still needed.
        needed = {depth for index, depth in self.stops.items() if index >= step.index}
        self.original = {d: states for d, states in self.original.items() if d in needed}
        if self.reference is None or self.reference[0] != stop:
            self.reference = stop, self._log_probs([h.to(self.device) for h in self.original[stop]])
        return self.reference

    def _pruned_log_probs(self, step, subset: tuple[int, ...], stop: int, batches: slice | None = None) -> list:
        """Log-probabilities read at depth `stop` with layer `step.index` pruned to `subset`."""
        with self.adapter.pruned_view(self.model, {step.index: list(subset)}):
            return self._log_probs(self._states(step, step.index, stop, batches=batches)[0])

    def rounds_for_layer(self, step) -> RoundScorer:
        """The divergence per sequence, a batch a round, for racing the shortlist (`search.race`)."""
        return _SequenceRounds(self, step, *self._reference(step), look=self.batch_size)

    def for_layer(self, step) -> Rescorer:
        stop, reference = self._reference(step)

        def rescore(subsets: list[tuple[int, ...]]) -> list[float]:
            divergences = []
            for subset in subsets:
                pruned = self._pruned_log_probs(step, subset, stop)
                divergences.append(mean_divergence(reference, pruned, self.divergence))
            # Under torchrun each rank scored its own sequences: weight their means by token counts.
            return reduce_means(divergences, sum(ref[..., 0].numel() for ref in reference))

        return rescore


@dataclass
class _SequenceRounds:
    """A `search.RoundScorer` for one MoE layer: round r is cached batch r (under torchrun, every rank's
    batch r, gathered in rank order)."""

    rescorer: EndToEndRescorer
    step: LayerStep
    stop: int
    reference: list[torch.Tensor]

    look: int  # sequences per batch: one look per batch of one process, however many ranks share a round

    @property
    def rounds(self) -> int:
        return len(self.reference)

    def __call__(self, subsets: list[tuple[int, ...]], round: int) -> torch.Tensor:
        rows = []
        for subset in subsets:
            (pruned,) = self.rescorer._pruned_log_probs(self.step, subset, self.stop, slice(round, round + 1))
            rows.append(sequence_divergences(self.reference[round], pruned, self.rescorer.divergence))
        return gather_sequences(torch.stack(rows))
