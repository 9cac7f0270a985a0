"""MXFP4 checkpoints (`quant_method: mxfp4`): gpt-oss-20b and gpt-oss-120b as published.

Only the routed experts are quantized, and only in the fused layout (transformers'
`Mxfp4GptOssExperts`; the hub has no per-expert MXFP4 layout). For each of
`mlp.experts.gate_up_proj` and `mlp.experts.down_proj` the checkpoint stores

- `NAME_blocks`: uint8, experts x out x (in / 32) x 16, two FP4 (e2m1) codes a
  byte, the even element in the low nibble;
- `NAME_scales`: uint8, experts x out x (in / 32), one e8m0 exponent per 32
  values: the block is multiplied by 2 ** (byte - 127).

Rows are output features, so the decoded tensor is experts x out x in, and
gpt-oss's float modules hold its transpose (x @ W: experts x in x out), with
gate and up interleaved along the last axis as in the float checkpoint. Every
part has the experts along dim 0, so the export slices blocks and scales
alike under the logical name (a stacked expert tensor).
"""

from __future__ import annotations

import re

import torch

from ..errors import FailedRun
from .base import QuantFormat

_PART = re.compile(r"^(?P<logical>.+\.experts\.(?:gate_up_proj|down_proj))_(?P<role>blocks|scales)$")
_VALUES_PER_BLOCK = 32  # the MX block: one shared exponent per 32 values
_E8M0_BIAS = 127


def _e2m1_values() -> torch.Tensor:
    """The 16 FP4 e2m1 values by code, from the bit layout (sign | 2 exponent bits | 1 mantissa bit)."""
    codes = torch.arange(16)
    sign = 1.0 - 2.0 * (codes >> 3).float()
    exponent, mantissa = ((codes >> 1) & 3).float(), (codes & 1).float()
    subnormal = mantissa * 0.5  # exponent 0: 0 or 0.5
    normal = torch.exp2(exponent - 1) * (1 + mantissa / 2)
    return sign * torch.where(exponent == 0, subnormal, normal)


class Mxfp4(QuantFormat):
    quant_method = "mxfp4"
    label = "MXFP4"
    roles = ("blocks", "scales")
    requires = (("accelerate", "accelerate>=0.26"),)

    def split(self, name: str) -> tuple[str, str] | None:
        if m := _PART.match(name):
            return m["logical"], m["role"]
        return None

    @staticmethod
    def _check(logical: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        if (
            blocks.dtype != torch.uint8
            or blocks.shape[:-1] != scales.shape
            or blocks.shape[-1] != _VALUES_PER_BLOCK // 2
        ):
            raise FailedRun(
                f"{logical}: blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} are not "
                "MXFP4 (uint8 blocks of 16 bytes, one scale per block); the checkpoint does not match its "
                "quantization_config"
            )

    def dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        blocks, scales = parts["blocks"], parts["scales"]
        self._check(logical, blocks, scales)
        codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # low nibble first
        values = _e2m1_values()[codes.long()] * torch.exp2(scales.float() - _E8M0_BIAS).unsqueeze(-1)
        return values.flatten(-2).transpose(-1, -2).contiguous()

    def reference_dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """transformers' own decoder (the one its quantizer loads gpt-oss with), not ours."""
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        self._check(logical, parts["blocks"], parts["scales"])
        return convert_moe_packed_tensors(parts["blocks"], parts["scales"], dtype=torch.float32)

    def transformers_load_kwargs(self) -> dict:
        """Dequantize on load (the comparison runs on the CPU, where the MXFP4 kernels do not)."""
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
