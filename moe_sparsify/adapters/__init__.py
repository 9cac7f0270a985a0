"""Architecture adapters, looked up by the config's `model_type`."""

from __future__ import annotations

from ..errors import UsageError
from .base import MoEAdapter, TensorRule
from .biased_sigmoid import (
    AfmoeAdapter,
    BiasedSigmoidAdapter,
    HunyuanV3Adapter,
    LagunaAdapter,
    Lfm2MoeAdapter,
    MinimaxM3Adapter,
)
from .cohere import Cohere2MoeAdapter
from .deepseek import (
    BeamAdapter,
    DeepseekAdapter,
    ExaoneMoeAdapter,
    KimiLinearAdapter,
    MimoV2FlashAdapter,
    NemotronHAdapter,
)
from .ernie import ErnieMoeAdapter
from .gpt_oss import GptOssAdapter
from .hunyuan import HunyuanMoeAdapter
from .jamba import JambaAdapter
from .mixtral import AriaTextAdapter, GraniteMoeAdapter, MixtralAdapter
from .phimoe import PhimoeAdapter
from .qwen import FlintAdapter, Qwen2MoeAdapter, Qwen35MoeAdapter, QwenMoeAdapter, UngatedSharedExpertAdapter

FAMILIES: tuple[type[MoEAdapter], ...] = (
    MixtralAdapter,
    GraniteMoeAdapter,
    AriaTextAdapter,
    JambaAdapter,
    Qwen2MoeAdapter,
    Qwen35MoeAdapter,
    QwenMoeAdapter,
    UngatedSharedExpertAdapter,
    FlintAdapter,
    DeepseekAdapter,
    ExaoneMoeAdapter,
    MimoV2FlashAdapter,
    BeamAdapter,
    KimiLinearAdapter,
    NemotronHAdapter,
    BiasedSigmoidAdapter,
    HunyuanV3Adapter,
    AfmoeAdapter,
    LagunaAdapter,
    MinimaxM3Adapter,
    Lfm2MoeAdapter,
    HunyuanMoeAdapter,
    ErnieMoeAdapter,
    Cohere2MoeAdapter,
    GptOssAdapter,
    PhimoeAdapter,
)
ADAPTERS: dict[str, type[MoEAdapter]] = {t: cls for cls in FAMILIES for t in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config) -> MoEAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UsageError(
            f"model type {model_type!r} is not a supported MoE architecture (supported: "
            f"{', '.join(supported_model_types())}); add an adapter in moe_sparsify/adapters/"
        )
    return ADAPTERS[model_type](config)


__all__ = ["ADAPTERS", "MoEAdapter", "TensorRule", "adapter_for", "supported_model_types"]
