"""GPT-OSS (transformers 5.x).

From models/gpt_oss/modeling_gpt_oss.py: the router (`mlp.router`, with a
bias) takes top-k of the raw logits and a softmax over those k, which equals
the renormalised top-k of a softmax over all experts. The experts are
transposed (x @ W), gate and up interleaved along the last dimension, with
per-expert biases and a clamped SwiGLU (`_apply_gate`), which the base
adapter's expert forward calls. The block returns (output, router scores).
Router bias and both expert biases are sliced with the experts on export.
"""

from __future__ import annotations

from .base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    model_types = ("gpt_oss",)
    expert_count_keys = ("num_local_experts",)
    router_attr = "router"
    block_returns_tuple = True
