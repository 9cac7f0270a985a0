"""Divergences between next-token distributions: what the e2e search minimises and what `eval` reports.

Inputs are batches of log-probabilities over the vocabulary (last dimension);
results are means per token.
"""

from __future__ import annotations

import torch

from .choices import DIVERGENCES


def _divergence_sum(p: torch.Tensor, q: torch.Tensor, kind: str) -> float:
    """Summed over tokens."""
    if kind == "kl":  # KL(p || q): mass the original puts where the pruned model does not
        return (p.exp() * (p - q)).sum().item()
    if kind == "reverse_kl":
        return (q.exp() * (q - p)).sum().item()
    mid = torch.logaddexp(p, q) - torch.log(torch.tensor(2.0))  # Jensen-Shannon
    return 0.5 * (_divergence_sum(p, mid, "kl") + _divergence_sum(q, mid, "kl"))


def mean_divergence(reference: list[torch.Tensor], log_probs: list[torch.Tensor], kind: str = "kl") -> float:
    """Mean per token of `kind` (one of DIVERGENCES; "kl" is KL(reference || other)) between batches."""
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r} is not one of {', '.join(DIVERGENCES)}")
    total = sum(_divergence_sum(ref, got, kind) for ref, got in zip(reference, log_probs))
    return total / sum(ref[..., 0].numel() for ref in reference)
