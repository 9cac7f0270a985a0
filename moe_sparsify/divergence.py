"""Divergences between next-token distributions: what the e2e search minimises and what `eval` reports.

Inputs are batches of log-probabilities over the vocabulary (last dimension);
results are means per token.
"""

from __future__ import annotations

import torch

from .choices import DIVERGENCES


def _check(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r} is not one of {', '.join(DIVERGENCES)}")


def _terms(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """The divergence's terms, one per (token, vocabulary entry); JS: both halves, to be halved."""
    if kind == "kl":  # KL(p || q): mass the original puts where the pruned model does not
        return p.exp() * (p - q)
    if kind == "reverse_kl":
        return q.exp() * (q - p)
    mid = torch.logaddexp(p, q) - torch.log(torch.tensor(2.0))  # Jensen-Shannon
    return torch.stack([_terms(p, mid, "kl"), _terms(q, mid, "kl")])


def _divergence_sum(p: torch.Tensor, q: torch.Tensor, kind: str) -> float:
    """Summed over tokens (JS: each half summed, then averaged, as e2e plans have always been scored)."""
    if kind == "js":
        return 0.5 * sum(half.sum().item() for half in _terms(p, q, kind))
    return _terms(p, q, kind).sum().item()


def mean_divergence(reference: list[torch.Tensor], log_probs: list[torch.Tensor], kind: str = "kl") -> float:
    """Mean per token of `kind` (one of DIVERGENCES; "kl" is KL(reference || other)) between batches."""
    _check(kind)
    total = sum(_divergence_sum(ref, got, kind) for ref, got in zip(reference, log_probs))
    return total / sum(ref[..., 0].numel() for ref in reference)


def sequence_divergences(reference: torch.Tensor, log_probs: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Mean per token of `kind` for each sequence of one batch (sequences x positions x vocabulary):
    the per-sequence values whose mean over equally long sequences is `mean_divergence`."""
    _check(kind)
    terms = _terms(reference, log_probs, kind)
    if kind == "js":
        terms = 0.5 * terms.sum(0)
    return terms.flatten(1).sum(1).double() / reference[0, ..., 0].numel()
