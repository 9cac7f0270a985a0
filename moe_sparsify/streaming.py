"""Models larger than memory: a meta-device skeleton whose decoder layers are loaded one at a time.

`StreamedModel` builds the model on the meta device, loads only what lies
outside the decoder layers (embeddings, final norm, head, rotary tables), and
materialises one decoder layer at a time from the safetensors shards
(`load_layer`), releasing it back to the meta device afterwards
(`release_layer`). Checkpoints in the hub's per-expert layout are stacked
into the fused 3-D expert tensors that transformers 5.x modules hold, as
transformers' own loader does. Peak memory is about one decoder layer plus
the activations, whatever the number of layers.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import quant
from .adapters import MoEAdapter
from .calibration.propagate import propagate
from .errors import FailedRun, UsageError, first_line
from .model_config import auto_model_class, load_config
from .quant.reader import DequantizingReader

INDEX = "model.safetensors.index.json"


def _libc_malloc_trim():
    """glibc's malloc_trim, or None off glibc. Freed activations of a few MB land in the heap once glibc
    has raised its mmap threshold, and stay resident; trimming after each layer keeps peak memory flat
    in the number of layers (measured: +45 MB a layer without it, none with it)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()
_PER_EXPERT = re.compile(
    r"^(?P<head>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_GATE, _UP, _DOWN = ("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")


class CheckpointReader:
    """Tensors of a safetensors checkpoint by name, read one at a time."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        self.dir, self.weight_map = model_dir, weight_map
        self._handles: dict[str, object] = {}

    def names(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def _handle(self, name: str):
        shard = self.weight_map[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.dir / shard, framework="pt")
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the shard's header: the tensor is not read."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self) -> None:
        """Unmap the shards: pages read through an open mapping count as resident memory."""
        self._handles.clear()


def _module_name(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """A checkpoint tensor's name in transformers 5.x modules (the adapter's legacy renames applied)."""
    for old, new in renames:
        name = name.replace(old, new)
    return name


def module_state(
    reader: CheckpointReader, prefix: str, renames: tuple[tuple[str, str], ...]
) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, named as the module names them, per-expert tensors stacked."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in reader.names(prefix):
        key = _module_name("." + name[len(prefix) :], renames)[1:]
        if m := _PER_EXPERT.match(key):
            experts.setdefault(m["head"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = reader.get(name)
        else:
            state[key] = reader.get(name)

    def pick(head: str, expert: int, names: tuple[str, str]) -> torch.Tensor:
        tensors = experts[head][expert]
        found = next((tensors[name] for name in names if name in tensors), None)
        if found is None:
            raise FailedRun(
                f"the checkpoint in {reader.dir} has no {prefix}{head}.{expert}.{names[0]} (or {names[1]}) weight; "
                "re-save or re-download the checkpoint"
            )
        return found

    for head, by_expert in experts.items():
        ids = sorted(by_expert)
        try:
            gate_up = [torch.cat([pick(head, e, _GATE), pick(head, e, _UP)]) for e in ids]
            state[f"{head}.gate_up_proj"] = torch.stack(gate_up)
            state[f"{head}.down_proj"] = torch.stack([pick(head, e, _DOWN) for e in ids])
        except RuntimeError as exc:  # experts of different shapes cannot be stacked
            raise FailedRun(
                f"the expert weights under {prefix}{head} in {reader.dir} differ in shape ({first_line(exc)}); "
                "re-save or re-download the checkpoint"
            ) from None
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put the tensors themselves into the meta module (assign): no second copy of the layer."""
    targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    state = {k: v.to(device=device, dtype=targets[k].dtype) for k, v in state.items() if k in targets}
    module.load_state_dict(state, strict=True, assign=True)


def open_reader(model_dir: Path, reference_decode: bool = False):
    """The checkpoint's tensors by name; a quantized checkpoint's weights decoded to float under their
    float names (with the format's reference decode where `reference_decode`)."""
    fmt = quant.detect(model_dir)
    raw = CheckpointReader(model_dir)
    return raw if fmt is None else DequantizingReader(raw, fmt, reference=reference_decode)


class StreamedModel:
    """A causal LM whose decoder layers live on the meta device until `load_layer`. A quantized
    checkpoint becomes the float model its config describes, its weights decoded as they are read."""

    def __init__(self, model_dir: Path, adapter: MoEAdapter, dtype: torch.dtype, reference_decode: bool = False):
        if adapter.config_section:
            raise UsageError(
                f"the language model of a multimodal checkpoint ({adapter.config_section}) cannot be streamed from "
                "disk; run without --stream"
            )
        if not adapter.streamable:
            raise UsageError(
                f"{adapter.config.model_type} checkpoints are converted on load beyond renaming tensors, so their "
                "layers cannot be streamed from disk; run without --stream"
            )
        config = load_config(model_dir)
        if hasattr(config, "quantization_config"):  # our reader decodes; transformers must not swap modules
            del config.quantization_config
        with torch.device("meta"):
            self.model = auto_model_class(config).from_config(config, dtype=dtype).eval()
        self.adapter, self.reader = adapter, open_reader(model_dir, reference_decode)
        layers = adapter.decoder_layers(self.model)
        inside = {id(m) for m in layers.modules()}
        for name, module in list(self.model.named_modules()):
            if id(module) in inside or not (module._parameters or module._buffers):
                continue
            if module._non_persistent_buffers_set:  # e.g. rotary tables: computed, not stored
                parent_name, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), attr, type(module)(config=config))
                continue
            stored = [k for k in module._parameters if f"{name}.{k}" in self.reader.weight_map]
            own = {k: self.reader.get(f"{name}.{k}") for k in stored}
            module.to_empty(device="cpu", recurse=False)
            for key, tensor in own.items():
                module._parameters[key].data.copy_(tensor)
        if getattr(config, "tie_word_embeddings", False):
            self.model.tie_weights()
        self.reader.close()

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        layer = self.adapter.decoder_layers(self.model)[index]
        state = module_state(self.reader, f"model.layers.{index}.", self.adapter.checkpoint_renames)
        try:
            _load_into(layer, state, device)
        except RuntimeError as exc:  # load_state_dict's missing keys or size mismatches, several lines
            detail = " ".join(str(exc).split())
            raise FailedRun(
                f"decoder layer {index} of the checkpoint in {self.reader.dir} does not fit its config: {detail}; "
                "re-save or re-download the checkpoint"
            ) from None
        self.reader.close()
        return layer

    def load_all(self) -> nn.Module:
        """Every decoder layer on the CPU: the whole model in memory."""
        for index in range(len(self.adapter.decoder_layers(self.model))):
            self.load_layer(index, torch.device("cpu"))
        return self.model

    def release_layer(self, index: int) -> None:
        self.adapter.decoder_layers(self.model)[index].to("meta")
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def router_weights(self) -> dict[int, torch.Tensor]:
        """Each MoE layer's router weight, read from the checkpoint alone (that tensor only)."""
        weights, renames = {}, self.adapter.checkpoint_renames
        for index in self.adapter.moe_layers(self.model):
            layer = self.adapter.decoder_layers(self.model)[index]
            router = self.adapter.router_weight(self.adapter.moe_block(layer))
            path = f"model.layers.{index}." + next(n for n, p in layer.named_parameters() if p is router)
            names = self.reader.names(f"model.layers.{index}.")
            stored = next((n for n in names if _module_name(n, renames) == path), None)
            if stored is None:
                raise FailedRun(
                    f"the checkpoint in {self.reader.dir} has no router weight {path}; re-save or re-download it"
                )
            weights[index] = self.reader.get(stored)
        self.reader.close()
        return weights


@torch.no_grad()
def streamed_logits(
    model_dir: Path,
    adapter: MoEAdapter,
    token_ids: torch.Tensor,
    kept: dict[int, list[int]] | None = None,
    reference_decode: bool = False,
) -> torch.Tensor:
    """float32 CPU logits of a checkpoint (pruned in place to `kept`), one decoder layer in memory at a time."""
    streamed = StreamedModel(model_dir, adapter, torch.float32, reference_decode)
    kept = kept or {}
    cpu = torch.device("cpu")
    batches = propagate(
        streamed.model,
        adapter,
        token_ids,
        lambda step: kept.get(step.index),
        batch_size=len(token_ids),
        device=cpu,
        residency=streamed,
    )
    return torch.cat([adapter.final_logits(streamed.model, hidden).float() for hidden, _ in batches])
