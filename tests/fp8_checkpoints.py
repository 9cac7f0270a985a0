"""Tiny FP8 block-quantized checkpoints in the published on-disk layout, and their float copies.

The hub layout (DeepSeek-V3, Qwen3-*-FP8): every linear weight of the decoder layers
except the router is float8_e4m3fn codes `NAME.weight` with float32
`NAME.weight_scale_inv` of ceil(rows / b0) x ceil(cols / b1) blocks, partial at the
edges; embeddings, norms, router and head stay float. config.json carries
`quantization_config: {quant_method: fp8, weight_block_size: [b0, b1], ...}`.
The fused layout stores `experts.gate_up_proj` / `experts.down_proj` (experts x rows x
cols) with `experts.gate_up_proj_scale_inv` (experts x row blocks x column blocks).

The float copy holds the weights dequantized by this module's own block loop (the
semantics of DeepSeek's reference `weight_dequant`), under the float checkpoint's names.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0  # largest float8_e4m3fn
_QUANTIZED = re.compile(r"^model\.layers\.\d+\..*\.weight$")
_FLOAT_KEPT = re.compile(r"(norm|\.gate\.weight$|\.router\.)")  # norms and routers stay float on the hub
_PER_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, weight_scale_inv) of a (..., rows, cols) weight, one scale per block, edges partial."""
    rows, cols = weight.shape[-2:]
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.empty(*weight.shape[:-2], *grid, dtype=torch.float32)
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            tile = weight[..., rs, cs].float()
            s = tile.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / FP8_MAX
            scale[..., i, j] = s
            codes[..., rs, cs] = (tile / s[..., None, None]).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.float32)
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[..., rs, cs] = codes[..., rs, cs].float() * scale[..., i, j].unsqueeze(-1).unsqueeze(-1)
    return out


def _fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> experts.gate_up_proj (gate rows, then up rows) and experts.down_proj."""
    fused, experts = {}, {}
    for name, tensor in state.items():
        if m := _PER_EXPERT.match(name):
            experts.setdefault(m["head"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = tensor
        else:
            fused[name] = tensor
    for head, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        fused[f"{head}.gate_up_proj"] = torch.stack([torch.cat([t["gate_proj"], t["up_proj"]]) for t in ordered])
        fused[f"{head}.down_proj"] = torch.stack([t["down_proj"] for t in ordered])
    return fused


def write_fp8(float_dir: Path, fp8_dir: Path, copy_dir: Path, block: tuple[int, int], fused: bool = False) -> None:
    """From a float checkpoint (one model.safetensors, per-expert layout): its FP8 version and the
    float copy of what that FP8 checkpoint encodes (same layout as the FP8 one, float weights)."""
    state = load_file(float_dir / "model.safetensors")
    if fused:
        state = _fuse_experts(state)
    quantized, decoded = {}, {}
    for name, tensor in state.items():
        is_fused = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if (is_fused or _QUANTIZED.match(name)) and tensor.dim() >= 2 and not _FLOAT_KEPT.search(name):
            codes, scale = quantize(tensor, block)
            quantized[name] = codes
            quantized[name + "_scale_inv" if is_fused else name[: -len(".weight")] + ".weight_scale_inv"] = scale
            decoded[name] = dequantize(codes, scale, block).to(tensor.dtype)
        else:
            quantized[name] = decoded[name] = tensor
    config = json.loads((float_dir / "config.json").read_text())
    for target, tensors in ((fp8_dir, quantized), (copy_dir, decoded)):
        target.mkdir(parents=True)
        for path in float_dir.iterdir():
            if path.name not in ("model.safetensors", "config.json"):
                (target / path.name).write_bytes(path.read_bytes())
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    qconfig = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}, indent=2))
    (copy_dir / "config.json").write_text(json.dumps(config, indent=2))
