"""Architecture adapters, looked up by the config's `model_type`."""

from __future__ import annotations

from ..errors import UsageError

# Each family module registers its adapters as it defines them (MoEAdapter.__init_subclass__).
from . import (  # noqa: F401
    biased_sigmoid,
    cohere,
    dbrx,
    deepseek,
    ernie,
    gpt_oss,
    hunyuan,
    jamba,
    llama4,
    mixtral,
    phimoe,
    qwen,
)
from .base import ADAPTERS, MoEAdapter, TensorRule


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


# Where multimodal configs keep their language model's config (transformers' get_text_config).
TEXT_CONFIG_SECTIONS = ("text_config", "language_config", "llm_config")


def adapter_for(config) -> MoEAdapter:
    """The adapter for a config; for a multimodal checkpoint whose language model is a supported MoE
    (AutoModelForCausalLM loads just that model), the adapter of its text config."""
    model_type = getattr(config, "model_type", None)
    section = None
    if model_type not in ADAPTERS and hasattr(config, "get_text_config"):
        text = config.get_text_config()
        nested = next((key for key in TEXT_CONFIG_SECTIONS if getattr(config, key, None) is text), None)
        if nested is not None and getattr(text, "model_type", None) in ADAPTERS:
            config, model_type, section = text, text.model_type, nested
    if model_type not in ADAPTERS:
        raise UsageError(
            f"model type {model_type!r} is not a supported MoE architecture (supported: "
            f"{', '.join(supported_model_types())}); add an adapter in moe_sparsify/adapters/ (docs/adapters.md)"
        )
    adapter = ADAPTERS[model_type](config)
    adapter.config_section = section
    _check_expert_counts(adapter)
    return adapter


def _check_expert_counts(adapter: MoEAdapter) -> None:
    """A config whose top-k is 0 or above its expert count loads, routes nothing sensible, and would be
    pruned without complaint: refuse it, naming the two numbers."""
    try:
        n, k = adapter.num_experts, adapter.top_k
    except AttributeError as exc:
        raise UsageError(f"the model config names no expert count ({exc}); fix its config.json") from None
    if all(isinstance(c, int) and not isinstance(c, bool) for c in (n, k)) and not 1 <= k <= n:
        raise UsageError(
            f"the model config gives {n} experts per MoE layer and {k} experts per token (top-k); a MoE layer "
            "needs 1 <= top-k <= experts; fix its config.json"
        )


__all__ = ["ADAPTERS", "MoEAdapter", "TensorRule", "adapter_for", "supported_model_types"]
