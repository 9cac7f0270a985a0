"""Quantized checkpoints in, the same format out.

A quantized checkpoint is searched on its weights decoded to float, and its
export copies the kept experts' raw tensors (codes, scales, zero points) byte
for byte, renumbered; nothing is dequantized and requantized on the way out.

`detect(model_dir)` reads `quantization_config` from config.json (or its
`text_config`) and returns the registered `QuantFormat` for its
`quant_method`, None for a float checkpoint, and refuses, before any work and
naming the format, a method no format handles (GPTQ, AWQ, bitsandbytes, HQQ,
...) or a directory of GGUF files.

A format plugs in by subclassing `base.QuantFormat` and calling
`register(cls)` in this package. What it implements:

- `split(name) -> (logical, role) | None`: which raw tensors form one logical
  weight. The logical name is the float checkpoint's (`x.weight`,
  `mlp.experts.gate_up_proj`); roles name the parts (FP8: `weight`,
  `weight_scale_inv`, `activation_scale`; MXFP4 `blocks`, `scales`;
  compressed-tensors `weight_packed`, `weight_scale`, `weight_zero_point`,
  `weight_shape`). `roles` lists them, codes first; `optional_roles` those a
  weight may lack. `group(names)` (given) keeps the weights that have every
  required role: the others are stored as is.
- `dequantize(logical, parts) -> float32 tensor` in the logical weight's
  shape: what the search runs on, in memory and with `--stream` alike
  (`reader.DequantizingReader` presents the checkpoint as a float one).
- `reference_dequantize(logical, parts)`: the same, written separately and
  plainly from the format's documented semantics. Verification decodes the
  export with it (or with transformers' own loader where
  `transformers_decodes(shapes)` says that loader is exact), never with the
  decode under test, so a decoding error cannot agree with itself.
- `export_alias(name)` (given: the logical name): how the export classifies a
  raw tensor. Per-expert tensors (`experts.7.down_proj.weight_scale_inv`) are
  matched by the adapter's rules under their own names and renamed; fused
  3-D tensors (`experts.down_proj_scale_inv`) are classified under their
  logical name and sliced along the expert axis (dim 0), scales and zero
  points like the codes. A quantized router cannot lose rows without
  requantizing and is refused before any work.
- `pruned_config(quantization_config, kept)` (given): module-name lists that
  name experts (`modules_to_not_convert`, `ignore`) lose removed experts and
  renumber kept ones.
- `requires`: (module, pip requirement) pairs transformers needs to load the
  format on the CPU; `check_requirements()` refuses in one line with the pip
  command.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .base import QuantFormat
from .compressed import CompressedTensors
from .fp8 import FP8Block
from .mxfp4 import Mxfp4

FORMATS: dict[str, type[QuantFormat]] = {}

# quant_method values transformers knows that no registered format handles, as messages name them.
_KNOWN_LABELS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "quanto": "Quanto",
    "torchao": "torchao",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "fbgemm_fp8": "FBGEMM FP8",
    "bitnet": "BitNet",
    "auto-round": "AutoRound",
    "quark": "Quark",
    "fp_quant": "FP-Quant",
    "mxfp4": "MXFP4",
    "compressed-tensors": "compressed-tensors",
}


def register(cls: type[QuantFormat]) -> type[QuantFormat]:
    FORMATS[cls.quant_method] = cls
    return cls


register(FP8Block)
register(Mxfp4)
register(CompressedTensors)


def quantization_config(config: dict) -> dict | None:
    """The checkpoint's quantization_config: top level, or a multimodal checkpoint's text_config. The
    mapping itself, not a copy: the export rewrites it in place."""
    text = config.get("text_config")
    found = config.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
    if found and not isinstance(found, dict):
        raise UsageError(
            f"config.json's quantization_config is {type(found).__name__} {found!r}, not a mapping with a "
            "quant_method; fix config.json or pass the float checkpoint"
        )
    return found or None


def _method(qconfig: dict) -> str:
    method = qconfig.get("quant_method")
    if method is None and (qconfig.get("load_in_4bit") or qconfig.get("load_in_8bit")):
        return "bitsandbytes"  # configs older than quant_method
    return str(method)


def _refuse(model_dir: Path, what: str) -> UsageError:
    handled = ", ".join(sorted(FORMATS)) or "none"
    return UsageError(
        f"{model_dir} is a {what} checkpoint, which moe-sparsify cannot prune (quantized formats handled: {handled}); "
        "pass the float checkpoint it was made from"
    )


def detect(model_dir: Path) -> QuantFormat | None:
    """The checkpoint's quantization format, None for a float checkpoint; refuses formats not handled."""
    model_dir = Path(model_dir)
    if any(model_dir.glob("*.gguf")) and not any(model_dir.glob("*.safetensors")):
        raise _refuse(model_dir, "GGUF")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the config loader reports an unreadable config in its own words
    if not isinstance(config, dict):
        return None  # the same: a list or a number is no config
    qconfig = quantization_config(config)
    if qconfig is None:
        return None
    method = _method(qconfig)
    if method not in FORMATS:
        label = _KNOWN_LABELS.get(method, method)
        raise _refuse(model_dir, f"{label} (quantization_config.quant_method: {method})")
    return FORMATS[method](qconfig)


__all__ = ["FORMATS", "QuantFormat", "detect", "quantization_config", "register"]
