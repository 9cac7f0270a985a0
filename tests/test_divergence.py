"""Divergences between next-token distributions."""

import pytest
import torch

from moe_sparsify.divergence import DIVERGENCES, mean_divergence


def test_divergences_are_zero_on_equal_inputs_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    p = [torch.log_softmax(torch.randn(2, 5, 11, generator=gen), -1)]
    q = [torch.log_softmax(torch.randn(2, 5, 11, generator=gen), -1)]
    for kind in DIVERGENCES:
        assert mean_divergence(p, p, kind) == pytest.approx(0.0, abs=1e-6)
        assert mean_divergence(p, q, kind) > 0
    assert mean_divergence(p, q, "js") == pytest.approx(mean_divergence(q, p, "js"), rel=1e-5)
    assert mean_divergence(p, q, "reverse_kl") == pytest.approx(mean_divergence(q, p, "kl"), rel=1e-6)


def test_an_unknown_divergence_is_refused_not_taken_for_another():
    p = [torch.log_softmax(torch.randn(1, 3, 5), -1)]
    with pytest.raises(ValueError, match="not one of kl, reverse_kl, js"):
        mean_divergence(p, p, "jsd")
