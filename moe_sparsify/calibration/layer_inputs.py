"""Where a layer-wise decision gets each MoE layer's inputs: interchangeable sources.

A source walks the MoE layers in order and hands each one, as a `LayerStep`, to a
`decide(step) -> kept experts` callable. Two sources exist:

- `StoredInputs`: the inputs the original model produced, read from a calibration
  directory (layer-wise mode, nothing is run but the layer being decided);
- `PropagatedInputs`: the model is run now, one decoder layer at a time; with
  `feed_forward` (progressive and compensating modes) each layer's decision prunes it before it
  produces the next layer's inputs; with `track_original` (compensating) the original model's
  stream runs beside it, and each step carries that stream's MoE inputs too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from rich.progress import Progress
from torch import nn

from ..adapters import MoEAdapter
from ..distributed import world
from .propagate import LayerStep, Resident, propagate
from .store import CalibrationStore

Decide = Callable[[LayerStep], list[int]]


class LayerInputs(Protocol):
    def walk(self, decide: Decide) -> None: ...


class StoredInputs:
    """Each MoE layer's stored inputs, this rank's share of the sequences, in batches of `batch_size` sequences.

    `seq_len` is the stored calibration's (its token windows' width), not a setting: the stored tensor
    is tokens x hidden and is cut back into sequences to share them between ranks."""

    def __init__(
        self,
        store: CalibrationStore,
        model: nn.Module,
        adapter: MoEAdapter,
        *,
        seq_len: int,
        batch_size: int,
        device: torch.device,
        residency=None,
        progress: Progress | None = None,
    ):
        self.store, self.model, self.adapter = store, model, adapter
        self.seq_len, self.batch_size, self.device = seq_len, batch_size, device
        self.residency = residency or Resident(model, adapter)
        self.progress = progress

    def walk(self, decide: Decide) -> None:
        moe_layers = self.adapter.moe_layers(self.model)
        self.store.check_layers(moe_layers)
        task = self.progress.add_task("layers", total=len(moe_layers)) if self.progress else None
        rank, size = world()  # this rank's share of the sequences, as with sampled tokens
        for index in moe_layers:
            layer = self.residency.load_layer(index, self.device)
            try:
                stored = self.store.layer_inputs(index)
                hidden = stored.shape[-1]
                mine = stored.view(-1, self.seq_len, hidden)[rank::size].reshape(-1, hidden)
                inputs = mine.to(device=self.device, dtype=next(layer.parameters()).dtype)
                batches = list(inputs.split(self.batch_size * self.seq_len))
                decide(LayerStep(index, self.adapter.moe_block(layer), batches, batches=[]))
            finally:  # as in `propagate`: a refusal or an interrupt leaves no layer visiting the device
                self.residency.release_layer(index)
            if self.progress:
                self.progress.advance(task)


class PropagatedInputs:
    """Each MoE layer's inputs produced now from `token_ids`; `feed_forward`: the next layer sees this
    layer pruned to its decision (progressive mode), else the original layer's outputs (layer-wise)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        token_ids: torch.Tensor,
        *,
        feed_forward: bool,
        batch_size: int,
        device: torch.device,
        residency=None,
        activations=None,
        progress: Progress | None = None,
        track_original: bool = False,
    ):
        self.model, self.adapter, self.token_ids, self.feed_forward = model, adapter, token_ids, feed_forward
        self.track_original = track_original
        self.batch_size, self.device = batch_size, device
        self.residency, self.activations, self.progress = residency, activations, progress

    def walk(self, decide: Decide) -> None:
        def on_layer(step: LayerStep) -> list[int] | None:
            kept = decide(step)
            return kept if self.feed_forward else None

        propagate(
            self.model,
            self.adapter,
            self.token_ids,
            on_layer,
            batch_size=self.batch_size,
            device=self.device,
            progress=self.progress,
            residency=self.residency,
            activations=self.activations,
            track_original=self.track_original,
        )
