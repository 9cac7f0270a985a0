"""Architecture adapters, looked up by the config's `model_type`."""

from __future__ import annotations

from ..errors import UsageError
from .base import MoEAdapter, TensorRule
from .biased_sigmoid import (
    AfmoeAdapter,
    BiasedSigmoidAdapter,
    HunyuanV3Adapter,
    KolibriAdapter,
    LagunaAdapter,
    Lfm2MoeAdapter,
    MinimaxM3Adapter,
)
from .cohere import Cohere2MoeAdapter
from .dbrx import DbrxAdapter
from .deepseek import (
    Axk2Adapter,
    BeamAdapter,
    DeepseekAdapter,
    ExaoneMoeAdapter,
    GlmMoeDsaAdapter,
    HYV4Adapter,
    KimiLinearAdapter,
    MimoV2FlashAdapter,
    Mistral4Adapter,
    NemotronHAdapter,
)
from .ernie import ErnieMoeAdapter
from .gpt_oss import GptOssAdapter
from .hunyuan import HunyuanMoeAdapter
from .jamba import JambaAdapter
from .llama4 import Llama4Adapter
from .mixtral import AriaTextAdapter, GraniteMoeAdapter, MixtralAdapter
from .phimoe import PhimoeAdapter
from .qwen import (
    FlintAdapter,
    Qwen2MoeAdapter,
    Qwen3VLMoeAdapter,
    Qwen4ExpAdapter,
    Qwen35MoeAdapter,
    QwenMoeAdapter,
    UngatedSharedExpertAdapter,
)

FAMILIES: tuple[type[MoEAdapter], ...] = (
    MixtralAdapter,
    GraniteMoeAdapter,
    AriaTextAdapter,
    JambaAdapter,
    Llama4Adapter,
    DbrxAdapter,
    Qwen2MoeAdapter,
    Qwen35MoeAdapter,
    QwenMoeAdapter,
    Qwen3VLMoeAdapter,
    Qwen4ExpAdapter,
    UngatedSharedExpertAdapter,
    FlintAdapter,
    DeepseekAdapter,
    ExaoneMoeAdapter,
    MimoV2FlashAdapter,
    BeamAdapter,
    Axk2Adapter,
    GlmMoeDsaAdapter,
    HYV4Adapter,
    KimiLinearAdapter,
    Mistral4Adapter,
    NemotronHAdapter,
    BiasedSigmoidAdapter,
    HunyuanV3Adapter,
    AfmoeAdapter,
    LagunaAdapter,
    MinimaxM3Adapter,
    Lfm2MoeAdapter,
    KolibriAdapter,
    HunyuanMoeAdapter,
    ErnieMoeAdapter,
    Cohere2MoeAdapter,
    GptOssAdapter,
    PhimoeAdapter,
)
ADAPTERS: dict[str, type[MoEAdapter]] = {t: cls for cls in FAMILIES for t in cls.model_types}


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
    return adapter


__all__ = ["ADAPTERS", "MoEAdapter", "TensorRule", "adapter_for", "supported_model_types"]
