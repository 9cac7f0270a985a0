"""Perplexity with a sliding window.

The text is tokenised as one stream (documents joined by end-of-text). Windows
of `window` tokens start every `stride` tokens; each window scores only the
tokens not scored by the previous one, so every token after the first is
predicted exactly once, with at least `window - stride` tokens of context
(except near the start). This is the transformers documentation's recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .divergence import mean_divergence
from .errors import UsageError


def check_scorable(token_ids: torch.Tensor, window: int, source) -> None:
    """Refuse a text shorter than one window: its perplexity would rest on a handful of predictions,
    each with less context than the window promises, and read like a measurement."""
    tokens = len(token_ids)
    if tokens < max(window, 2):
        shorter = f" (or --window {tokens} --stride {tokens // 2})" if tokens >= 2 else ""
        raise UsageError(
            f"--text {source} holds {tokens} token(s), fewer than one --window of {window}; pass a longer text{shorter}"
        )


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    window: int,
    stride: int,
    device: torch.device,
    on_window: Callable[[], None] | None = None,
) -> dict:
    """`on_window` is called after each scored window (progress on long texts)."""
    token_ids = token_ids.reshape(-1)
    nll, counted, scored_until = 0.0, 0, 1  # the first token has no prediction
    for start in range(0, max(1, len(token_ids) - 1), stride):
        end = min(start + window, len(token_ids))
        chunk = token_ids[start:end].to(device).unsqueeze(0)
        logits = model(input_ids=chunk, use_cache=False).logits[0].float()
        # Position p predicts token p + 1; score targets in [scored_until, end).
        first_target = max(scored_until, start + 1)
        targets = chunk[0, first_target - start :]
        preds = logits[first_target - start - 1 : end - start - 1]
        nll += F.cross_entropy(preds, targets, reduction="sum").item()
        counted += targets.numel()
        scored_until = end
        if on_window is not None:
            on_window()
        if end == len(token_ids):
            break
    return {
        "perplexity": math.exp(nll / counted),
        "nll_per_token": nll / counted,
        "tokens": counted,
        "window": window,
        "stride": stride,
    }


@torch.no_grad()
def next_token_log_probs(model, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> list[torch.Tensor]:
    """float32 log-probabilities per batch of token windows (N x L)."""
    return [
        torch.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1).cpu()
        for batch in windows.split(batch_size)
    ]


@torch.no_grad()
def mean_kl(
    model, windows: torch.Tensor, reference: list[torch.Tensor], device: torch.device, batch_size: int = 8
) -> float:
    """Mean per token of KL(reference || model) over next-token distributions of token windows."""
    return mean_divergence(reference, next_token_log_probs(model, windows, device, batch_size), "kl")
