"""Sliding-window perplexity on a model with known output: every token scored once, progress per window."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moe_sparsify.evaluate import perplexity

VOCAB = 7


class Uniform(torch.nn.Module):
    """Logits of zeros: every next token has probability 1 / VOCAB, so the perplexity is exactly VOCAB."""

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


@pytest.mark.parametrize(("tokens", "window", "stride"), [(100, 32, 16), (33, 32, 16), (10, 32, 16), (101, 20, 19)])
def test_every_token_is_scored_once_and_each_window_reports_progress(tokens, window, stride):
    ticks = []
    ids = torch.randint(0, VOCAB, (tokens,))
    result = perplexity(Uniform(), ids, window, stride, torch.device("cpu"), on_window=lambda: ticks.append(1))
    assert result["tokens"] == tokens - 1
    assert result["perplexity"] == pytest.approx(VOCAB)
    # Windows start every `stride` tokens until one reaches the end of the text.
    expected_windows = next(i + 1 for i, start in enumerate(range(0, tokens, stride)) if start + window >= tokens)
    assert len(ticks) == expected_windows
    assert result["nll_per_token"] == pytest.approx(math.log(VOCAB))
