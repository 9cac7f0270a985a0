"""A quantized checkpoint presented as the float checkpoint it encodes, one tensor at a time."""

from __future__ import annotations

import torch

from ..errors import FailedRun
from .base import QuantFormat


class DequantizingReader:
    """Wraps a `streaming.CheckpointReader`: each quantized weight appears under its logical (float)
    name, decoded on read; its raw parts (codes, scales, ...) are hidden; other tensors pass through.

    reference=True decodes with the format's `reference_dequantize` (verification's side)."""

    def __init__(self, raw, fmt: QuantFormat, reference: bool = False):
        self.raw, self.fmt, self.dir = raw, fmt, raw.dir
        self.groups = fmt.group(raw.weight_map)
        parts = {name for group in self.groups.values() for name in group.values()}
        self.weight_map = {name: shard for name, shard in raw.weight_map.items() if name not in parts}
        # Listed in the shard of one of its parts (which part holds the codes differs between formats).
        self.weight_map.update({logical: raw.weight_map[next(iter(g.values()))] for logical, g in self.groups.items()})
        self._decode = fmt.reference_dequantize if reference else fmt.dequantize

    def names(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def get(self, name: str) -> torch.Tensor:
        if name in self.groups:
            return self._decode(name, {role: self.raw.get(raw) for role, raw in self.groups[name].items()})
        tensor = self.raw.get(name)
        if tensor.element_size() == 1:  # 1-byte codes without their scales would be read as plain numbers
            raise FailedRun(
                f"{name} is stored as {str(tensor.dtype).removeprefix('torch.')} without the {self.fmt.roles[1]} "
                f"beside it; the checkpoint does not match its {self.fmt.label} quantization_config"
            )
        return tensor

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Raw shapes of each quantized weight's parts (logical -> role -> shape), read from the headers."""
        return {logical: {role: self.raw.shape(raw) for role, raw in g.items()} for logical, g in self.groups.items()}

    def close(self) -> None:
        self.raw.close()
