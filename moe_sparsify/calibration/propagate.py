"""Run a model one decoder layer at a time over calibration tokens.

The sparsegpt/wanda shape: catch the inputs of decoder layer 0 (hidden states)
and the keyword arguments the model passes each layer (rotary embeddings,
positions, and a mask that differs between sliding-window and full-attention
layers, or between attention and linear-attention layers), then for each layer move it to the compute
device, run it on every batch while a hook records its MoE block's inputs,
let the caller decide, and feed the outputs (from the original layer, or from
the pruned one in progressive mode) to the next layer. Only the current layer
needs to be on the compute device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import nn

from ..adapters import MoEAdapter
from ..errors import FailedRun


@dataclass
class LayerStep:
    """What the caller sees of one MoE layer during propagation."""

    index: int
    block: nn.Module
    inputs: list[torch.Tensor]  # the MoE block's inputs, per batch, tokens x hidden
    batches: list[tuple[torch.Tensor, list[dict]]]  # per batch: this layer's hidden states, every layer's kwargs
    # With `track_original`: the MoE block's inputs in the original (unpruned) model, aligned with `inputs`.
    original_inputs: list[torch.Tensor] | None = None


# on_layer(step) -> experts to keep while producing the next layer's inputs, or None for all.
LayerCallback = Callable[[LayerStep], list[int] | None]


class _Caught(Exception):
    pass


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def run_layer(layer, hidden: torch.Tensor, kwargs: list[dict], index: int, adapter: MoEAdapter) -> torch.Tensor:
    """Decoder layer `index` on one batch. Where the family hands a layer output on to the next layer
    (GLM-MoE-DSA: the attention indexer's top-k as `prev_topk_indices`), store it in the next layer's
    kwargs, as the model's own loop does."""
    out = layer(hidden, **kwargs[index])
    if adapter.carried_kwarg is not None and index + 1 < len(kwargs):
        kwargs[index + 1][adapter.carried_kwarg] = out[1]
    return layer_output(out)


def run_cached(
    model: nn.Module,
    adapter: MoEAdapter,
    residency,
    batches: list[tuple[torch.Tensor, list[dict]]],
    start: int,
    stop: int,
    device: torch.device,
    also_at: set[int] = frozenset(),
    park_at: torch.device | None = None,
) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
    """Decoder layers start..stop-1 over cached batches (a layer's hidden states, every layer's kwargs):
    layer `start` is the one on the device now, the later ones visit it one at a time through
    `residency`. Returns the states at `stop` and, by depth, those at the depths in `also_at`, moved to
    `park_at` as they are made when given (so that many depths need not fit on the device at once)."""
    layers = adapter.decoder_layers(model)
    # Each pass gets its own copies of the layer kwargs: an output a layer hands to the next one differs
    # between passes (the subsets or the weights being compared).
    batches = [(hidden, [dict(kw) for kw in kwargs]) for hidden, kwargs in batches]
    states = [hidden.to(device) for hidden, _ in batches]
    at_depth = {}
    for index in range(start, stop):
        layer = layers[index] if index == start else residency.load_layer(index, device)
        try:
            states = [run_layer(layer, h, kwargs, index, adapter) for h, (_, kwargs) in zip(states, batches)]
        finally:
            if index != start:
                residency.release_layer(index)
        if index + 1 in also_at:
            at_depth[index + 1] = states if park_at is None else [h.to(park_at) for h in states]
    return states, at_depth


def catch_layer_inputs(
    model: nn.Module, adapter: MoEAdapter, token_ids: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per batch: layer 0's hidden states and the keyword arguments of every decoder layer.

    Each layer's forward is swapped (on the instance, so attributes the model reads, such as
    `attention_type`, stay) for a recorder that passes the hidden states through untouched: no layer
    computes (they may still be on the meta device), and the model's own per-layer choice of mask and
    positions is recorded."""
    layers = adapter.decoder_layers(model)
    caught: list[tuple[torch.Tensor, list[dict]]] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                caught.append((hidden, []))
            caught[-1][1].append(dict(kwargs))
            if index == len(layers) - 1:
                raise _Caught
            # Families that hand a second output to the next layer get a placeholder: propagation fills in
            # the real one as it runs each layer (`run_layer`).
            return hidden if adapter.carried_kwarg is None else (hidden, None)

        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        for start in range(0, len(token_ids), batch_size):
            try:
                model(input_ids=token_ids[start : start + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if caught and len(caught[0][1]) < len(layers):
        raise FailedRun(
            f"the model's forward ran {len(caught[0][1])} of its {len(layers)} decoder layers (extra layers, such as "
            "multi-token-prediction heads, are not supported); report the model type"
        )
    return caught


def _recorder(store: list[torch.Tensor], park):
    def hook(module, args):
        store.append(park(args[0].reshape(-1, args[0].shape[-1])))

    return hook


def place_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move embeddings, norms, rotary tables and head to `device`, leaving decoder layers where they are."""
    inside = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)


def _run_recorded(run, layer, index: int, stream, block, park) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the layer's outputs on `stream`, its MoE block's inputs recorded on the way)."""
    captured: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(_recorder(captured, park)) if block is not None else None
    try:
        return run(layer, index, stream), captured
    finally:
        if handle is not None:
            handle.remove()


class Resident:
    """Decoder layers held in (CPU) memory: a layer visits the compute device while it is used.
    `streaming.StreamedModel` offers the same two calls for layers read from disk instead.

    A layer's host tensors are kept while it visits, and on release only the tensors that changed on
    the device are copied back: the rest point at their host copies again. Copying every weight back
    to pageable host memory was 97 % of calibration's CUDA time on an H200, for weights that only
    `--recover` ever changes. A change is seen as a new tensor (`param.data = ...`) or an in-place write
    through the parameter or a view of it (its version counter); a write through `param.data.copy_`
    bypasses the counter, so code that changes weights must not write that way."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter):
        self.model, self.layers = model, adapter.decoder_layers(model)
        self.home = next(self.layers[0].parameters()).device
        self.visiting: dict[int, list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]] = {}

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        layer = self.layers[index]
        if device == self.home or index in self.visiting:
            return layer
        visit = []
        for tensor in [*layer.parameters(), *layer.buffers()]:
            host = tensor.data
            tensor.data = host.to(device, copy=True)
            visit.append((tensor, host, (tensor.data_ptr(), tensor._version)))
        self.visiting[index] = visit
        return layer

    def release_layer(self, index: int) -> None:
        for tensor, host, loaded in self.visiting.pop(index, []):
            changed = (tensor.data_ptr(), tensor._version) != loaded
            tensor.data = tensor.data.to(self.home) if changed else host


@torch.no_grad()
def propagate(
    model: nn.Module,
    adapter: MoEAdapter,
    token_ids: torch.Tensor,
    on_layer: LayerCallback,
    *,
    batch_size: int,
    device: torch.device,
    progress: Progress | None = None,
    residency=None,
    activations=None,
    track_original: bool = False,
) -> list[tuple[torch.Tensor, list[dict]]]:
    """Returns the last layer's outputs per batch (with every layer's kwargs). Whether it returns or
    raises, the layer in use is released and the modules outside the layers go back to the model's device.

    residency: how decoder layers reach the device (default: held in memory).
    activations: an `offload.ActivationStore` deciding where hidden states and MoE inputs wait between
    layers (default: on the compute device); consumers move chunks to the device as they read them.
    track_original: also run the original model's stream beside the pruned one (each layer before the
    callback changes it), and give the callback that stream's MoE inputs (`LayerStep.original_inputs`).
    """
    residency = residency or Resident(model, adapter)
    # Where a hidden state or MoE input waits until the next layer reads it (`activations`, or where it is).
    park = activations.put if activations is not None else (lambda t: t)
    layers = adapter.decoder_layers(model)
    home = next(p.device for p in model.parameters() if p.device.type != "meta")
    place_outside_layers(model, layers, device)
    batches = [(park(h), kw) for h, kw in catch_layer_inputs(model, adapter, token_ids, batch_size, device)]
    # The original stream gets its own kwargs: a layer's output carried to the next one differs between streams.
    originals = [(h, [dict(kw) for kw in kwargs]) for h, kwargs in batches] if track_original else None
    task = progress.add_task("layers", total=len(layers)) if progress else None

    def run(layer, index, stream):
        return [park(run_layer(layer, hidden.to(device), kwargs, index, adapter)) for hidden, kwargs in stream]

    try:
        for index in range(len(layers)):
            if activations is not None:
                activations.new_generation()
            layer = residency.load_layer(index, device)
            try:
                block = adapter.moe_block(layer)
                outputs, captured = _run_recorded(run, layer, index, batches, block, park)
                if originals is not None:
                    original_outputs, original_captured = _run_recorded(run, layer, index, originals, block, park)
                    originals = [(out, kwargs) for out, (_, kwargs) in zip(original_outputs, originals)]
                if block is not None:
                    original = original_captured if originals is not None else None
                    kept = on_layer(LayerStep(index, block, captured, batches, original))
                    if kept is not None and len(kept) < adapter.num_experts:
                        with adapter.pruned_view(model, {index: kept}):
                            outputs = run(layer, index, batches)
                batches = [(out, kwargs) for out, (_, kwargs) in zip(outputs, batches)]
            finally:  # a callback that raises (a refusal, an interrupt) must not leave the layer visiting
                residency.release_layer(index)
            if progress:
                progress.advance(task)
    finally:
        place_outside_layers(model, layers, home)
    return batches
