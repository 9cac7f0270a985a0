"""A checkpoint's config as every forward here runs it, and the transformers class that loads it:
what loading a whole model (`models`) and streaming its layers (`streaming`) both start from."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError

# Flags a trained checkpoint's config.json may keep that change what a forward does or returns, not what
# the model computes. Every model built here runs with these values; an export writes config.json from
# the source file, so the user's values travel unchanged. Training-only randomness (router jitter,
# dropout) is off because every model is in eval mode; PhiMoE's router_jitter_noise is an inference-time
# routing constant and is deliberately not listed.
INFERENCE_FLAGS = {
    "output_router_logits": False,  # its load-balancing loss reads router logits our routers never record
    "output_attentions": False,  # would force eager attention and materialise every attention map
    "output_hidden_states": False,  # would keep every layer's hidden states alive through the forward
    "return_dict": True,  # results are read by name (.logits, .last_hidden_state)
    "use_cache": True,  # generation decodes with a KV cache as served; plain forwards pass use_cache=False
}


def load_config(model_dir: Path):
    """The checkpoint's config as every forward here runs it: INFERENCE_FLAGS applied."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # OSError, ValueError, KeyError, hub's typed-field errors, a list for a mapping
        model_type = _declared_model_type(model_dir)
        if model_type is not None and "does not recognize this architecture" in str(exc):
            import transformers

            raise UsageError(
                f"{model_dir}/config.json declares model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not know; check the model_type, or upgrade transformers"
            ) from None
        raise UsageError(f"cannot read the model config in {model_dir}: {joined(exc)}; fix its config.json") from None
    return for_inference(config)


def _declared_model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def joined(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut at `limit` characters: a field error names the field on its
    first line and what is wrong with it on the next."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def for_inference(config):
    """INFERENCE_FLAGS set on `config` and its nested configs (a multimodal model's text config), in place.
    The attention kernel is left to from_pretrained's default: a training run's saved choice
    (`attn_implementation: flash_attention_2`) may name a package not installed here, and a config
    read with output_attentions true has already switched to eager attention."""
    config._attn_implementation = None
    for name, value in INFERENCE_FLAGS.items():
        if hasattr(config, name):
            setattr(config, name, value)
    for key in getattr(config, "sub_configs", {}) or {}:
        nested = getattr(config, key, None)
        if nested is not None and hasattr(nested, "to_dict"):
            for_inference(nested)
    return config


def auto_model_class(config):
    """AutoModelForCausalLM, or for a vision-language checkpoint it cannot load (Qwen3-VL-MoE,
    GLM-4.5V) AutoModelForImageTextToText: a text-only forward of those runs their language model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM
