"""The exact reconstruction loss of every expert subset, from per-token scalars.

For one MoE layer and kept set C the paper minimises ||F'(x, C) - F(x)||^2
summed over calibration tokens. Per token, both outputs are weighted sums of
the same candidate expert outputs o_1..o_m (the token's original top-m with
m = k + n - r), so with a the new weights and a0 the original ones

    ||sum_j a_j o_j - sum_j a0_j o_j||^2 = (a - a0)^T G (a - a0),  G = o o^T.

`LayerStats.collect` evaluates each candidate expert once per token and keeps
only G (tokens x m x m); `SubsetLoss` then scores any number of subsets
without touching a hidden vector again. The (a - a0) form avoids the
cancellation of expanding ||y||^2 - 2 a.b + a^T G a.

Where the weights depend only on which candidates are selected (renormalised
top-k, sigmoid scores), a token's loss takes one of C(m, k) values, one per
selection pattern. Those are computed once per token; scoring a subset is
then a table look-up per token (which of its candidates survive -> pattern),
so scoring 70 subsets costs little more than scoring 28.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .routing import RoutingSpec, choice_scores, scores, selection_counts, subset_weights

ExpertFn = Callable[[torch.Tensor, int], torch.Tensor]
RouterFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerStats:
    """Per-token quantities of one MoE layer that every subset score needs."""

    num_experts: int
    spec: RoutingSpec
    cand_idx: torch.Tensor  # tokens x m, original rank order
    cand_logits: torch.Tensor  # tokens x m, float32
    gram: torch.Tensor  # tokens x m x m, float32
    logits: torch.Tensor | None  # tokens x n, kept only where weights need all kept logits

    @property
    def num_tokens(self) -> int:
        return self.cand_idx.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.cand_idx.shape[1]

    @classmethod
    def collect(
        cls,
        inputs: Iterable[torch.Tensor],
        router_logits: RouterFn,
        expert_forward: ExpertFn,
        spec: RoutingSpec,
        num_experts: int,
        num_candidates: int,
        selection_bias: torch.Tensor | None = None,
    ) -> LayerStats:
        """inputs: chunks of MoE-block inputs (tokens x hidden) on the compute device.
        Candidates are ranked as the router ranks them (scores plus any selection bias)."""
        needs_all_logits = spec.scoring == "softmax" and not spec.renormalize
        parts: dict[str, list[torch.Tensor]] = {"idx": [], "logits": [], "gram": [], "all": []}
        for x in inputs:
            logits = router_logits(x).float()
            cand_idx = torch.topk(choice_scores(scores(logits, spec), None, selection_bias), num_candidates).indices
            outputs = torch.zeros(x.shape[0], num_candidates, x.shape[1], dtype=torch.float32, device=x.device)
            for expert in range(num_experts):
                token, slot = torch.nonzero(cand_idx == expert, as_tuple=True)
                if token.numel():
                    outputs[token, slot] = expert_forward(x[token], expert).float()
            parts["idx"].append(cand_idx.cpu())
            parts["logits"].append(torch.gather(logits, 1, cand_idx).cpu())
            parts["gram"].append(torch.bmm(outputs, outputs.transpose(1, 2)).cpu())
            if needs_all_logits:
                parts["all"].append(logits.cpu())
        return cls(
            num_experts=num_experts,
            spec=spec,
            cand_idx=torch.cat(parts["idx"]),
            cand_logits=torch.cat(parts["logits"]),
            gram=torch.cat(parts["gram"]),
            logits=torch.cat(parts["all"]) if needs_all_logits else None,
        )


# Pattern tables are used while they stay small; beyond, subsets are scored directly.
MAX_PATTERN_SLOTS = 16
MAX_PATTERNS = 4096


class SubsetLoss:
    """Exact mean-per-token reconstruction loss of kept-expert subsets."""

    def __init__(self, stats: LayerStats, token_chunk: int = 16384, use_patterns: bool = True):
        self.stats = stats
        self.num_experts = stats.num_experts
        self.token_chunk = token_chunk
        everything = torch.ones(1, stats.num_experts, dtype=torch.bool)
        self._base_weights = self._weights(everything, slice(None))[0]  # tokens x m
        m, k = stats.num_candidates, stats.spec.top_k
        self._patterns = None
        if use_patterns and stats.logits is None and m <= MAX_PATTERN_SLOTS and math.comb(m, k) <= MAX_PATTERNS:
            self._patterns = self._pattern_losses(m, k)

    def _pattern_losses(self, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lookup from kept-candidate bitmask to pattern id, tokens x patterns losses, expert -> slot bits)."""
        patterns = list(itertools.combinations(range(m), k))
        pattern_id = {p: i for i, p in enumerate(patterns)}
        lookup = torch.full((2**m,), -1, dtype=torch.long)
        for mask in range(2**m):
            first_k = tuple(j for j in range(m) if mask >> j & 1)[:k]
            if len(first_k) == k:
                lookup[mask] = pattern_id[first_k]
        selected = torch.zeros(len(patterns), m, dtype=torch.bool)
        for i, p in enumerate(patterns):
            selected[i, list(p)] = True
        losses = []
        for start in range(0, self.stats.num_tokens, self.token_chunk):
            tokens = slice(start, start + self.token_chunk)
            cand_logits = self.stats.cand_logits[tokens]
            weights = subset_weights(
                cand_logits, selected.unsqueeze(1).expand(-1, len(cand_logits), -1), self.stats.spec
            )
            losses.append(self._quadratic(weights, tokens).T)
        # slot_bits[e, t] = 2^j where expert e is token t's j-th candidate (exact in float32: m <= 16).
        cand_idx = self.stats.cand_idx
        slot_bits = torch.zeros(self.num_experts, len(cand_idx))
        slot_bits.scatter_(
            0, cand_idx.T, (2.0 ** torch.arange(m, dtype=torch.float32)).unsqueeze(1).expand(m, len(cand_idx))
        )
        return lookup, torch.cat(losses), slot_bits

    def min_keep(self) -> int:
        """Fewest experts this layer's candidates can score exactly."""
        s = self.stats
        return s.num_experts - (s.num_candidates - s.spec.top_k)

    def _weights(self, keep: torch.Tensor, tokens: slice) -> torch.Tensor:
        s = self.stats
        cand_kept = keep[:, s.cand_idx[tokens]]  # subsets x tokens x m
        lse = None
        if s.logits is not None:
            masked = s.logits[tokens].unsqueeze(0).masked_fill(~keep.unsqueeze(1), float("-inf"))
            lse = torch.logsumexp(masked, dim=-1)
        return subset_weights(s.cand_logits[tokens], cand_kept, s.spec, lse)

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """keep: subsets x n bool. Returns float64 losses (subsets,)."""
        keep = keep.reshape(-1, self.num_experts).bool()
        short = keep.sum(1).min().item()
        if short < self.min_keep():
            raise ValueError(
                f"a subset keeps {short} experts; these statistics are exact only down to {self.min_keep()}"
            )
        total = torch.zeros(keep.shape[0], dtype=torch.float64)
        for start in range(0, self.stats.num_tokens, self.token_chunk):
            tokens = slice(start, start + self.token_chunk)
            if self._patterns is not None:
                lookup, pattern_losses, slot_bits = self._patterns
                # Bit j of a token's mask says whether its j-th candidate survives: one small matmul.
                kept_bits = (keep.float() @ slot_bits[:, tokens]).long()  # subsets x tokens
                per_token = pattern_losses[tokens].gather(1, lookup[kept_bits].T).T
            else:
                per_token = self._quadratic(self._weights(keep, tokens), tokens)
            total += per_token.double().sum(dim=1)
        return total / self.stats.num_tokens

    def _quadratic(self, weights: torch.Tensor, tokens: slice) -> torch.Tensor:
        """(a - a0)^T G (a - a0) per subset and token."""
        delta = weights - self._base_weights[tokens].unsqueeze(0)
        return torch.einsum("stm,tmn,stn->st", delta, self.stats.gram[tokens], delta)

    def selection_counts(self) -> torch.Tensor:
        """How often each expert is in a token's original top-k."""
        top = self.stats.cand_idx[:, : self.stats.spec.top_k]
        return selection_counts(top, self.num_experts)

    def reap_saliency(self) -> torch.Tensor:
        """REAP (Cerebras, 2025): per expert, the mean over the tokens routed to it of its top-k-renormalised
        gate weight times the norm of its output. Norms come from the Gram diagonal. float64, n."""
        k = self.stats.spec.top_k
        weights = self._base_weights[:, :k].double()
        weights = weights / weights.sum(-1, keepdim=True)
        norms = torch.diagonal(self.stats.gram, dim1=1, dim2=2)[:, :k].double().clamp_min(0).sqrt()
        routed = self.stats.cand_idx[:, :k].reshape(-1)
        total = torch.zeros(self.num_experts, dtype=torch.float64).index_add_(0, routed, (weights * norms).reshape(-1))
        return total / self.selection_counts().clamp_min(1)
