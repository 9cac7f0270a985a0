"""FP8 block-quantized checkpoints (`quant_method: fp8`): DeepSeek-V3/R1, Qwen3-*-FP8, GLM-4.5-FP8, MiniMax-M2.

Each quantized linear stores `NAME.weight` (float8_e4m3fn codes, rows x cols) and
`NAME.weight_scale_inv` (float32, ceil(rows / b0) x ceil(cols / b1) for
`weight_block_size: [b0, b1]`; a scalar without a block size). Scale (i, j)
multiplies weight[i*b0 : (i+1)*b0, j*b1 : (j+1)*b1]; edge blocks are partial
(DeepSeek's reference `weight_dequant`). Fused expert tensors
(`experts.gate_up_proj`, `experts.down_proj`: experts x rows x cols) carry
`experts.gate_up_proj_scale_inv` with the same grid per expert. `scale_fmt:
ue8m0` stores each scale as a power of two, 2 ** (byte - 127).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import FailedRun, UsageError
from .base import QuantFormat

_FUSED = re.compile(
    r"^(?P<logical>.+\.experts\.(?:gate_up_proj|up_proj|down_proj))(?P<suffix>_scale_inv|_activation_scale)?$"
)
_PER_LINEAR = (
    (".weight_scale_inv", "weight_scale_inv"),
    (".activation_scale", "activation_scale"),
    (".weight", "weight"),
)
_FUSED_ROLES = {None: "weight", "_scale_inv": "weight_scale_inv", "_activation_scale": "activation_scale"}


class FP8Block(QuantFormat):
    quant_method = "fp8"
    label = "FP8 block-quantized"
    roles = ("weight", "weight_scale_inv", "activation_scale")
    optional_roles = ("activation_scale",)  # static activation scheme only; weights decode without it
    requires = (("accelerate", "accelerate>=0.26"),)

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("expert_dtype", "fp8") != "fp8":
            raise UsageError(
                f"FP8 checkpoints with expert_dtype {config['expert_dtype']!r} (packed FP4 experts) are not supported; "
                "use a checkpoint with FP8 or float experts"
            )
        block = config.get("weight_block_size")
        if block is not None and not (
            isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)
        ):
            raise UsageError(
                f"quantization_config.weight_block_size is {block!r}, not two positive integers like [128, 128] "
                "(or absent: one scale per tensor); fix config.json"
            )
        self.block: tuple[int, int] | None = tuple(block) if block else None
        self.ue8m0 = config.get("scale_fmt") == "ue8m0"

    def split(self, name: str) -> tuple[str, str] | None:
        if m := _FUSED.match(name):
            return m["logical"], _FUSED_ROLES[m["suffix"]]
        for suffix, role in _PER_LINEAR:
            if name.endswith(suffix):
                return name[: -len(suffix)] + ".weight", role
        return None

    def _scales(self, logical: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The scale grid in float32, checked against the codes' shape and the configured block."""
        if scale.dtype == torch.uint8 or (self.ue8m0 and scale.dtype != torch.float32):
            scale = (scale.view(torch.uint8).to(torch.float32) - 127.0).exp2()
        scale = scale.to(torch.float32)
        if self.block is None:
            expected = ()
        else:
            rows, cols = codes.shape[-2:]
            expected = (*codes.shape[:-2], math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
        if tuple(scale.shape) != expected and not (self.block is None and scale.numel() == 1):
            raise FailedRun(
                f"{logical}: weight_scale_inv has shape {tuple(scale.shape)}, but weight {tuple(codes.shape)} with "
                f"weight_block_size {list(self.block) if self.block else None} needs {expected}; the checkpoint's "
                "quantization_config does not describe its tensors"
            )
        return scale

    def dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = parts["weight"]
        scale = self._scales(logical, codes, parts["weight_scale_inv"])
        if self.block is None:
            return codes.to(torch.float32) * scale.reshape(())
        rows, cols = codes.shape[-2:]
        # Each scale spread over its block, the partial edge blocks cut to the weight's shape.
        spread = scale.repeat_interleave(self.block[0], dim=-2)[..., :rows, :]
        spread = spread.repeat_interleave(self.block[1], dim=-1)[..., :cols]
        return codes.to(torch.float32) * spread

    def reference_dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        # Written apart from `dequantize` on purpose: block by block, as DeepSeek's weight_dequant reads.
        codes = parts["weight"]
        scale = self._scales(logical, codes, parts["weight_scale_inv"])
        out = codes.to(torch.float32)
        if self.block is None:
            return out * scale.reshape(())
        b0, b1 = self.block
        for i in range(scale.shape[-2]):
            for j in range(scale.shape[-1]):
                out[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] *= scale[..., i, j, None, None]
        return out

    def transformers_decodes(self, shapes: dict[str, dict[str, tuple[int, ...]]]) -> bool:
        """transformers' CPU dequantization takes the block as shape / scale grid: right only where every
        dimension is a whole number of blocks (a 192-wide expert in 128-blocks decodes as 96-blocks)."""
        if self.block is None:
            return True
        return all(
            s["weight"][-2] % self.block[0] == 0 and s["weight"][-1] % self.block[1] == 0 for s in shapes.values()
        )

    def transformers_load_kwargs(self) -> dict:
        """Dequantize on load even where a GPU would keep FP8 (the comparison runs on the CPU)."""
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(weight_block_size=self.block, dequantize=True)}
