"""Multi-token-prediction (MTP) layers: stored on disk, dropped from the export.

DeepSeek-V3, GLM-4.5 and others keep `num_nextn_predict_layers` extra decoder layers beyond
`num_hidden_layers` (`model.layers.{N}.*`, with enorm / hnorm / eh_proj / shared_head and their own
routed experts); Qwen3-Next, Qwen3.5-MoE, MiMo and others keep them under an `mtp.` prefix. Stock
transformers ignores them on load; vLLM loads them for speculative decoding with the config's expert
count, so after pruning they must not keep the old count.

They are dropped and their count in the config set to 0, rather than pruned by the same search:
transformers has no forward for them, so their inputs (the next token's embedding joined to the main
model's last hidden state) could only come from a forward of our own, and the pruned MTP layer could
not be verified against stock transformers like the rest of the export. Dropping keeps the export
exactly what verification checks; the cost is speculative decoding, which a user can restore by
re-training an MTP head on the pruned model.
"""

from __future__ import annotations

import re

# Config keys that count MTP layers (DeepSeek-V3 / GLM-4.5, transformers' alias, Qwen3-Next style).
MTP_COUNT_KEYS = ("num_nextn_predict_layers", "num_mtp_layers", "mtp_num_hidden_layers")
# The text decoder stack of a causal LM, or of the language model inside a multimodal checkpoint.
_DECODER_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(?P<layer>\d+)\.")
_MTP_COMPONENT = re.compile(r"(?:^|\.)mtp[a-z_]*\.")


def mtp_layer_count(config: dict) -> int:
    return max((int(config.get(key) or 0) for key in MTP_COUNT_KEYS), default=0)


def mtp_tensor_filter(config: dict):
    """A predicate on checkpoint tensor names: True for a tensor of an MTP layer."""
    num_layers = int(config.get("num_hidden_layers") or 0)
    beyond = mtp_layer_count(config) > 0 and num_layers > 0

    def is_mtp(name: str) -> bool:
        if _MTP_COMPONENT.search(name):
            return True
        match = _DECODER_LAYER.match(name)
        return beyond and match is not None and int(match["layer"]) >= num_layers

    return is_mtp


def drop_mtp_config(config: dict) -> list[str]:
    """Set every MTP count key present to 0; returns 'key: old -> 0' lines."""
    changes = []
    for key in MTP_COUNT_KEYS:
        if config.get(key):
            changes.append(f"{key}: {config[key]} -> 0")
            config[key] = 0
    return changes
