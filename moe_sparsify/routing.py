"""Routing math, free of any model: who gets which experts with what weight.

Everything here works on router logits (tokens x n experts) and a keep mask
(n booleans). Removing experts from a checkpoint is the same as masking their
logits to -inf before scoring: a softmax over the kept logits equals the masked
softmax, and the top-k among the kept experts depends only on the order of
their scores. That identity is what lets the search score a subset exactly
without building the pruned model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class RoutingSpec:
    """How a model family turns router logits into (expert, weight) pairs.

    scoring: "softmax" or "sigmoid" applied to the logits.
    renormalize: divide the top-k weights by their sum (Mixtral: always).
    scale: multiply the final weights (DeepSeek's routed_scaling_factor).
    A per-expert selection bias (DeepSeek-V3's e_score_correction_bias) is
    added to the scores to choose experts, never to weight them; it is passed
    separately because it belongs to a layer, not to the family.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown scoring {self.scoring!r}")


def scores(logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Routing scores in float32 (removed experts: 0), the softmax taken over the kept experts only."""
    logits = logits.float()
    if spec.scoring == "softmax":
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(dim=-1)
    probs = logits.sigmoid()
    return probs if keep is None else probs.masked_fill(~keep, 0.0)


def choice_scores(
    probs: torch.Tensor, keep: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What experts are ranked by: the scores plus any selection bias; removed experts rank last."""
    choice = probs if bias is None else probs + bias.float()
    return choice if keep is None else choice.masked_fill(~keep, float("-inf"))


def route(
    logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices), both tokens x top_k, as the (pruned) model computes them."""
    probs = scores(logits, spec, keep)
    indices = torch.topk(choice_scores(probs, keep, bias), spec.top_k, dim=-1).indices
    weights = probs.gather(-1, indices)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * spec.scale, indices


def candidate_count(num_experts: int, top_k: int, keep: int) -> int:
    """Removing n - r experts only promotes lower-ranked ones, so a token's new
    top-k lies in its original top-(k + n - r)."""
    return min(num_experts, top_k + num_experts - keep)


def subset_weights(
    cand_logits: torch.Tensor,
    cand_kept: torch.Tensor,
    spec: RoutingSpec,
    kept_logsumexp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights on each token's candidates (in original rank order) for many subsets.

    cand_logits: tokens x m logits of the token's candidates, best first.
    cand_kept:   subsets x tokens x m, whether each candidate survives.
    kept_logsumexp: subsets x tokens, logsumexp over *all* kept logits; needed
        only for softmax without renormalisation, where the weight of an expert
        depends on every kept expert, not only the selected ones.
    Returns subsets x tokens x m float32, zero off the selection.
    """
    rank_among_kept = torch.cumsum(cand_kept.to(torch.int32), dim=-1)
    selected = cand_kept & (rank_among_kept <= spec.top_k)
    logits = cand_logits.float().unsqueeze(0)
    if spec.scoring == "softmax":
        if spec.renormalize:
            # p_j / sum_selected p == softmax over the selected logits.
            weights = torch.softmax(logits.masked_fill(~selected, float("-inf")), dim=-1)
        elif kept_logsumexp is None:
            raise ValueError("softmax without renormalisation needs the kept logsumexp")
        else:
            weights = torch.exp(logits - kept_logsumexp.unsqueeze(-1)) * selected
    else:
        weights = logits.sigmoid() * selected
        if spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * spec.scale


def selection_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How often each expert is among a token's chosen experts (int64, n)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)


# --- dynamic skipping rules (ALGORITHM.md section 2) -------------------------------------------------

SKIP_RULES = ("ratio", "tail")


def default_skip_rule(top_k: int) -> str:
    """The paper's ratio rule for top-2 models, the appendix's tail rule otherwise."""
    return "ratio" if top_k == 2 else "tail"


def check_skip_rule(rule: str, top_k: int) -> str:
    if rule not in SKIP_RULES:
        raise UsageError(f"unknown skip rule {rule!r}; choose one of {', '.join(SKIP_RULES)}")
    if rule == "ratio" and top_k != 2:
        raise UsageError(f"the ratio rule is for top-2 models; this one routes to {top_k}: use --rule tail")
    return rule


def skip_keep_mask(weights: torch.Tensor, beta: float, rule: str) -> torch.Tensor:
    """tokens x k bool: which of each token's routed pairs survive. The top expert always does."""
    if rule == "ratio":
        if weights.shape[-1] != 2:
            raise UsageError(f"the ratio rule is for top-2 models; this one routes to {weights.shape[-1]}: use tail")
        # No sort needed for two: keep what reaches beta x the larger (the larger itself, as beta <= 1).
        return weights >= min(beta, 1.0) * weights.max(dim=-1, keepdim=True).values
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    ranked = torch.gather(weights.float(), -1, order)
    if rule == "tail":
        total = ranked.sum(-1, keepdim=True)
        # tail[i] = mass after the top-(i+1); keep rank r while no shorter prefix already leaves tail <= beta.
        tail = total - torch.cumsum(ranked, dim=-1)
        prefix_ok = tail <= beta * total
        first_ok = torch.argmax(prefix_ok.int(), dim=-1, keepdim=True)  # the last column is always ok
        keep_ranked = torch.arange(ranked.shape[-1], device=weights.device) <= first_ok
    else:
        raise UsageError(f"unknown skip rule {rule!r}; choose one of {', '.join(SKIP_RULES)}")
    return torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)


def skipped_weights(weights: torch.Tensor, keep: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Zero the skipped pairs; for models that renormalise their top-k, rescale the survivors to the
    row's original total (1, or DeepSeek's routed_scaling_factor). Rows that lost no pair keep the
    router's weights bit for bit."""
    kept = weights * keep
    if not renormalize:
        return kept
    rescaled = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
    return torch.where(keep.all(-1, keepdim=True), weights, rescaled)
