"""The dynamic-skipping rules (Lu et al. 2024, section 2 and appendix A.2), pure tensor math.

On a token's top-k weights sorted w_1 >= ... >= w_k:
  ratio (top-2, the paper): drop expert 2 when w_2 < beta * w_1.
  tail  (top-k, appendix):  keep the smallest top-i whose dropped tail
        sum_{m>i} w_m <= beta * sum_{m<=k} w_m.
Surviving weights are renormalised when the model renormalises its top-k
(Mixtral: the lone survivor gets weight 1) and left as they are otherwise.

The adapters' reference forward, the threshold calibration (thresholds.py) and the skipping runtime
(skipping.py) all apply these; the runtime builds on the adapters and threshold files, so the rules
live apart from it and the imports point one way.
"""

from __future__ import annotations

import torch

from .choices import SKIP_RULES
from .errors import UsageError


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
