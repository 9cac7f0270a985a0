"""Tiny MXFP4 and compressed-tensors checkpoints in the published on-disk layouts, and their float copies.

MXFP4 (gpt-oss as published): `mlp.experts.gate_up_proj_blocks` / `_scales` and
`mlp.experts.down_proj_blocks` / `_scales` replace the fused float experts; everything
else stays float; `quantization_config: {quant_method: mxfp4, modules_to_not_convert: [...]}`.
The codes are written by a plain round-to-nearest MXFP4 quantizer here; the float copy
is decoded by transformers' own `convert_moe_packed_tensors`.

compressed-tensors (llm-compressor's output): every targeted linear of the per-expert
checkpoint is compressed by compressed-tensors' own compressor for the preset's format
(so the layout is the library's), scales from its own `calculate_qparams`; the float copy
is decoded by the same library's decompressor. The config is the library's
`QuantizationConfig`, serialised as llm-compressor writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_MXFP4_EXPERTS = re.compile(r"^.+\.experts\.(?:gate_up_proj|down_proj)$")
# What llm-compressor's recipes usually leave float: the head and the routers.
CT_IGNORE = ["lm_head", "re:.*block_sparse_moe\\.gate$", "re:.*mlp\\.gate$"]


def _write(float_dir: Path, target: Path, tensors: dict[str, torch.Tensor], qconfig: dict | None) -> None:
    target.mkdir(parents=True)
    for path in float_dir.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            (target / path.name).write_bytes(path.read_bytes())
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (target / "config.json").write_text(json.dumps(config, indent=2))


# --- MXFP4 -----------------------------------------------------------------------------------------
def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an experts x out x in weight: per 32 inputs the smallest power of two that
    brings the block within FP4's +-6, each value rounded to the nearest e2m1 code."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    magnitudes = torch.tensor(FP4_VALUES[:8])
    blocks = weight.float().unflatten(-1, (weight.shape[-1] // 32, 32))
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-126, 127)
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1)
    codes = (codes + 8 * ((scaled < 0) & (codes > 0))).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def write_mxfp4(float_dir: Path, quant_dir: Path, copy_dir: Path) -> None:
    """From a float gpt-oss checkpoint (fused experts, x @ W): its MXFP4 version and the float copy."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(float_dir / "model.safetensors")
    quantized, decoded = {}, {}
    for name, tensor in state.items():
        if _MXFP4_EXPERTS.match(name):
            blocks, scales = mxfp4_quantize(tensor.transpose(-1, -2))  # rows = output features on disk
            quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
            decoded[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).to(tensor.dtype)
        else:
            quantized[name] = decoded[name] = tensor
    qconfig = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    _write(float_dir, quant_dir, quantized, qconfig)
    _write(float_dir, copy_dir, decoded, None)


# --- compressed-tensors ---------------------------------------------------------------------------
def ct_scheme(preset: str, group_size: int | None = 16, targets=("Linear",)):
    """A compressed-tensors preset scheme (W4A16, W8A16, FP8_DYNAMIC, NVFP4A16, ...); `group_size` replaces
    a grouped preset's 128 so the tiny models' widths hold whole groups."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, list(targets))
    if scheme.weights.group_size and group_size:
        scheme.weights.group_size = group_size
    return scheme


def _qparams(weight: torch.Tensor, args):
    """compressed-tensors' own scales and zero points for one weight, reduced as its strategy says."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy in ("group", "tensor_group"):
        grouped = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        low, high = grouped.amin(-1), grouped.amax(-1)
    elif strategy == "channel":
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    else:
        low, high = weight.amin(), weight.amax()
    global_scale = generate_gparam(weight.amin(), weight.amax()) if strategy == "tensor_group" else None
    scale, zero_point = calculate_qparams(low, high, args, global_scale=global_scale)
    return scale, zero_point, global_scale


def write_compressed(float_dir: Path, quant_dir: Path, copy_dir: Path, scheme, ignore=CT_IGNORE) -> str:
    """From a float per-expert checkpoint: its compressed-tensors version (every linear the scheme targets,
    minus `ignore`) and the float copy. Returns the format written."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.utils.match import match_name

    from moe_sparsify.quant.compressed import library_nvfp4_float32

    fmt = str(infer_module_format(torch.nn.Linear, scheme).value)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = load_file(float_dir / "model.safetensors")
    quantized, decoded = {}, {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        linear = name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
        targeted = "Linear" in scheme.targets or any(match_name(module, t) for t in scheme.targets)
        if not (linear and targeted and "norm" not in module) or any(match_name(module, i) for i in ignore):
            quantized[name] = decoded[name] = tensor
            continue
        scale, zero_point, global_scale = _qparams(tensor.float(), scheme.weights)
        parts = {"weight": tensor, "weight_scale": scale, "weight_zero_point": zero_point}
        if global_scale is not None:
            parts["weight_global_scale"] = global_scale
        compressed = compressor.compress(parts, scheme)
        quantized.update({f"{module}.{role}": t.contiguous() for role, t in compressed.items()})
        if fmt == "nvfp4-pack-quantized":  # the library's math in float32 (its decompressor rounds to bf16)
            decoded[name] = library_nvfp4_float32(compressed, scheme).to(tensor.dtype)
        else:
            decoded[name] = compressor.decompress(dict(compressed), scheme)["weight"].to(tensor.dtype)
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        quant_method="compressed-tensors",
        format=fmt,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    ).model_dump(mode="json", exclude_none=True)
    _write(float_dir, quant_dir, quantized, qconfig)
    _write(float_dir, copy_dir, decoded, None)
    return fmt
