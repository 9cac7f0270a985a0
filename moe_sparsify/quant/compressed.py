"""compressed-tensors checkpoints (`quant_method: compressed-tensors`), as llm-compressor writes them.

Each quantized linear `NAME` stores, by the format of its config group
(`config_groups.*.format`, else the top-level `format`):

- `pack-quantized` (W4A16 as Kimi-K2-Thinking ships, W8A16): `NAME.weight_packed`
  (int32, the unsigned codes q + 2 ** (bits - 1) packed densely, low bits
  first), `NAME.weight_scale`, `NAME.weight_shape` (out, in), and for
  asymmetric schemes `NAME.weight_zero_point` (packed along the rows);
- `float-quantized` (FP8, FP8_DYNAMIC) and `int-quantized`: `NAME.weight`
  (float8_e4m3fn or int8 codes) and `NAME.weight_scale` (and a zero point);
- `nvfp4-pack-quantized`: `NAME.weight_packed` (uint8, two e2m1 codes a byte,
  low nibble first), `NAME.weight_scale` (float8_e4m3fn per 16 values) and
  `NAME.weight_global_scale` (the scale is divided by it).

Scales apply per tensor, per output row (channel), per group of
`group_size` inputs, or per block. Which group quantizes a module: the first
whose `targets` name it (`re:` regex or exact name; a class name such as
`Linear` covers every linear), unless `ignore` names it.

llm-compressor writes MoE checkpoints in the per-expert layout
(`experts.N.gate_proj.weight_packed`), every part of one expert beside its
codes, so the export renumbers them with the codes. Activation parameters
(`input_scale`, `input_global_scale`) are per module too and move with it.
"""

from __future__ import annotations

import re

import torch

from ..errors import FailedRun, UsageError
from .base import QuantFormat

# Every name a compressed-tensors format stores for one weight (transformers' serialized_names); the
# codes are `weight` or `weight_packed` by format, and `weight_scale` is always there.
ROLES = ("weight", "weight_scale", "weight_packed", "weight_zero_point", "weight_shape", "weight_global_scale")
_FUSED_EXPERTS = re.compile(r"\.experts\.(?:gate_up_proj|up_proj|down_proj)\.weight$")
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class CompressedTensors(QuantFormat):
    quant_method = "compressed-tensors"
    label = "compressed-tensors"
    roles = ROLES
    optional_roles = ("weight", "weight_packed", "weight_zero_point", "weight_shape", "weight_global_scale")
    requires = (("compressed_tensors", "compressed-tensors>=0.15"),)

    def __init__(self, config: dict):
        super().__init__(config)
        self.check_requirements()  # the config itself is parsed by compressed-tensors
        from compressed_tensors.quantization import QuantizationConfig

        try:
            self.parsed = QuantizationConfig.model_validate(config)
        except ValueError as exc:
            detail = " ".join(str(exc).split())
            raise UsageError(f"quantization_config is not a valid compressed-tensors config: {detail}") from None
        self._check_formats()

    def _check_formats(self) -> None:
        """compressed-tensors takes any string as a format; one it does not define would leave every
        weight undecodable, or (no group naming a tensor) the checkpoint read as if it were float."""
        from compressed_tensors.config import CompressionFormat

        known = {f.value for f in CompressionFormat}
        named = [self.parsed.format] + [scheme.format for scheme in self.parsed.config_groups.values()]
        for fmt in named:
            value = getattr(fmt, "value", fmt)
            if value is not None and value not in known:
                raise UsageError(
                    f"quantization_config names compressed-tensors format {value!r}, which compressed-tensors does "
                    f"not define ({', '.join(sorted(known))}); fix config.json or pass the float checkpoint"
                )

    # --- which raw tensors make one logical weight -------------------------------------------------
    def split(self, name: str) -> tuple[str, str] | None:
        module, _, role = name.rpartition(".")
        return (f"{module}.weight", role) if role in ROLES else None

    def group(self, names) -> dict[str, dict[str, str]]:
        """A weight is stored quantized when it has a scale beside its codes (`weight` or `weight_packed`)."""
        groups = {k: g for k, g in super().group(names).items() if "weight" in g or "weight_packed" in g}
        if fused := next((k for k in groups if _FUSED_EXPERTS.search(k)), None):
            raise UsageError(
                f"{fused.removesuffix('.weight')} holds compressed-tensors experts fused in one tensor, a layout "
                "moe-sparsify does not slice; use a checkpoint with per-expert tensors (what llm-compressor writes)"
            )
        return groups

    # --- the scheme of one module ----------------------------------------------------------------
    def scheme_for(self, logical: str):
        """(scheme, format) of the config group quantizing the module, as compressed-tensors matches it."""
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.utils.match import match_name

        module = logical.removesuffix(".weight")
        if not any(match_name(module, ignore) for ignore in self.parsed.ignore or ()):
            for scheme in self.parsed.config_groups.values():
                if "Linear" in scheme.targets or any(match_name(module, target) for target in scheme.targets):
                    fmt = scheme.format or self.parsed.format
                    if fmt in (None, "mixed-precision"):
                        fmt = infer_module_format(torch.nn.Linear, scheme)
                    return scheme, str(getattr(fmt, "value", fmt))
        raise FailedRun(
            f"{module} is stored quantized, but no config group of quantization_config targets it; the checkpoint "
            "does not match its quantization_config"
        )

    # --- decoding ------------------------------------------------------------------------------------
    def dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """compressed-tensors' own decompressor for the module's format."""
        from compressed_tensors.compressors import BaseCompressor

        scheme, fmt = self.scheme_for(logical)
        try:
            if fmt == "nvfp4-pack-quantized":
                return library_nvfp4_float32(parts, scheme)
            weight = BaseCompressor.get_value_from_registry(fmt).decompress(dict(parts), scheme)["weight"]
        except (KeyError, RuntimeError, ValueError, AssertionError) as exc:
            raise FailedRun(f"{logical}: cannot decode its {fmt} tensors ({exc}); the checkpoint is damaged") from None
        return weight.to(torch.float32)

    def reference_dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same from the format's documented layout, without compressed-tensors' code."""
        scheme, fmt = self.scheme_for(logical)
        args = scheme.weights
        if fmt == "pack-quantized":
            rows, cols = (int(v) for v in parts["weight_shape"])
            codes = _unpack_int32(parts["weight_packed"], args.num_bits, cols)
            zero = parts.get("weight_zero_point")
            if zero is not None and not args.symmetric and zero.dtype == torch.int32:  # packed along the rows
                zero = _unpack_int32(zero.T, args.num_bits, rows).T
        elif fmt == "nvfp4-pack-quantized":
            packed = parts["weight_packed"]
            nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
            magnitude = torch.tensor(_E2M1)[nibbles & 7]
            codes = torch.where(nibbles >= 8, -magnitude, magnitude)
            zero = None
        elif fmt in ("float-quantized", "int-quantized", "naive-quantized"):
            codes, zero = parts["weight"].to(torch.float32), parts.get("weight_zero_point")
        else:
            raise UsageError(f"{logical}: compressed-tensors format {fmt} is not supported")
        scale = parts["weight_scale"].to(torch.float32)
        if "weight_global_scale" in parts:
            scale = scale / parts["weight_global_scale"].to(torch.float32)
        codes = codes.to(torch.float32)
        if zero is not None:
            codes = codes - _spread(zero.to(torch.float32), codes.shape, args)
        return codes * _spread(scale, codes.shape, args)

    def transformers_decodes(self, shapes: dict[str, dict[str, tuple[int, ...]]]) -> bool:
        """transformers' loader hands its decompressor only codes, scales and shapes of fused experts: it
        drops asymmetric zero points (the load fails) and NVFP4's global scale (it decodes wrong, silently)."""
        for logical in shapes:
            scheme, fmt = self.scheme_for(logical)
            if fmt == "nvfp4-pack-quantized" or not scheme.weights.symmetric:
                return False
        return True

    def transformers_load_kwargs(self) -> dict:
        """Every module decompressed on load, so the comparison runs plain float32 modules."""
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def library_nvfp4_float32(parts: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """compressed-tensors' NVFP4 decode in float32: its decompressor unpacks to bfloat16 and rounds the
    values divided by the global scale there, which no serving kernel does."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed = parts["weight_packed"]
    codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    scale, global_scale = parts["weight_scale"].to(torch.float32), parts["weight_global_scale"].to(torch.float32)
    return dequantize(codes, scale, args=scheme.weights, dtype=torch.float32, global_scale=global_scale)


def _unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields packed densely into each row's int32 words, low bits first (a field may
    straddle two words), as signed codes."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # the word after the last
    start = torch.arange(cols) * bits
    word, offset = start // 32, start % 32
    fields = ((words[..., word] >> offset) | (words[..., word + 1] << (32 - offset))) & ((1 << bits) - 1)
    return fields - (1 << (bits - 1))


def _spread(values: torch.Tensor, shape: torch.Size, args) -> torch.Tensor:
    """Per-tensor, per-row, per-group or per-block parameters expanded to the weight's shape."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    rows, cols = shape
    if strategy in ("group", "tensor_group"):
        return values.repeat_interleave(args.group_size, dim=-1)[:, :cols]
    if strategy == "block":
        b0, b1 = args.block_structure
        return values.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]
    return values.reshape(-1, 1).expand(rows, cols) if values.numel() == rows else values.reshape(()).expand(rows, cols)
