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

The paper's progressive target: where the layer sees the pruned model's
inputs x' but must reproduce the original model's output F(x) (so it also
compensates the error of the layers before it), the target differs from the
full layer on x' by d = F(x) - F(x'), and per token

    ||sum_j (a_j - a0_j) o_j - d||^2 = (a - a0)^T G (a - a0) - 2 (a - a0).c + ||d||^2,  c = o d,

so the statistics gain c (tokens x m) and ||d||^2 (tokens), still scalars.

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

from .routing import (
    Ranking,
    RoutingSpec,
    Scoring,
    candidate_experts,
    choice_scores,
    group_relevant,
    scores,
    select,
    selection_counts,
    subset_weights,
)

ExpertFn = Callable[[torch.Tensor, int], torch.Tensor]
RouterFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerStats:
    """Per-token quantities of one MoE layer that every subset score needs."""

    num_experts: int
    spec: RoutingSpec
    min_keep: int  # exact for every subset keeping at least this many (equally per group where grouped)
    cand_idx: torch.Tensor  # tokens x m, padding = num_experts (see routing.candidate_experts)
    cand_logits: torch.Tensor  # tokens x m, float32, padding -inf
    cand_choice: torch.Tensor  # tokens x m, float32: what the router ranks by, padding -inf
    gram: torch.Tensor  # tokens x m x m, float32
    logits: torch.Tensor | None  # tokens x n, kept only where weights need all kept logits
    block: int | None = None  # group-limited routing: candidate slots per group block
    bias: torch.Tensor | None = None  # n, the selection bias, where the ranking depends on the kept set
    # Compensating target (see the module docstring): c = o d and ||d||^2 per token, else None (d = 0).
    offset_cross: torch.Tensor | None = None  # tokens x m, float32
    offset_sq: torch.Tensor | None = None  # tokens, float32

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
        keep: int,
        selection_bias: torch.Tensor | None = None,
        rows_per_pass: int | None = None,
        offsets: Iterable[torch.Tensor] | None = None,
    ) -> LayerStats:
        """inputs: chunks of MoE-block inputs (tokens x hidden) on the compute device.
        offsets: chunks (aligned with inputs) of d = target - F(inputs), the part of the target the full
        layer misses on these inputs (the paper's progressive target); None: the target is F(inputs).
        Candidates are every expert some subset of at least `keep` experts can route a token to
        (`routing.candidate_experts`), ranked as the router ranks them (scores plus any selection bias).
        rows_per_pass bounds the candidate-output buffer (rows x m x hidden floats): small on CPUs,
        where it keeps the expert matmuls in cache, large on GPUs; default by device."""
        if selection_bias is not None and spec.scoring is Scoring.SOFTMAX and spec.ranking is Ranking.SCORES:
            # The candidates would assume a fixed order that the bias breaks as experts go: a wrong search.
            raise ValueError("a selection bias on softmax scores needs ranking=Ranking.BIASED_SOFTMAX")
        parts: dict[str, list[torch.Tensor]] = {
            "idx": [],
            "logits": [],
            "choice": [],
            "gram": [],
            "all": [],
            "cross": [],
            "sq": [],
        }
        block = None
        for x, d in _split_aligned(inputs, offsets, rows_per_pass):
            logits = router_logits(x).float()
            probs = scores(logits, spec)
            choice = choice_scores(probs, None, selection_bias, logits if spec.ranking is Ranking.LOGITS else None)
            cand_idx, block = candidate_experts(choice, spec, keep, probs)
            outputs = _candidate_outputs(x, cand_idx, expert_forward, num_experts)
            padding = cand_idx == num_experts
            safe = cand_idx.clamp(max=num_experts - 1)
            parts["idx"].append(cand_idx.cpu())
            parts["logits"].append(torch.gather(logits, 1, safe).masked_fill(padding, float("-inf")).cpu())
            parts["choice"].append(torch.gather(choice, 1, safe).masked_fill(padding, float("-inf")).cpu())
            parts["gram"].append(torch.bmm(outputs, outputs.transpose(1, 2)).cpu())
            if d is not None:
                d = d.to(outputs)
                parts["cross"].append(torch.bmm(outputs, d.unsqueeze(-1)).squeeze(-1).cpu())
                parts["sq"].append((d * d).sum(-1).cpu())
            if spec.needs_all_logits:
                parts["all"].append(logits.cpu())
        # Group-limited chunks may differ in width (blocks of groups no token there can reach are left out).
        width = max(part.shape[1] for part in parts["idx"])
        return cls(
            num_experts=num_experts,
            spec=spec,
            min_keep=keep,
            cand_idx=_cat_padded(parts["idx"], width, num_experts),
            cand_logits=_cat_padded(parts["logits"], width, float("-inf")),
            cand_choice=_cat_padded(parts["choice"], width, float("-inf")),
            gram=_cat_padded(parts["gram"], width, 0.0),
            logits=torch.cat(parts["all"]) if spec.needs_all_logits else None,
            block=block,
            bias=selection_bias.float().cpu() if spec.choice_depends_on_kept else None,
            offset_cross=_cat_padded(parts["cross"], width, 0.0) if parts["cross"] else None,
            offset_sq=torch.cat(parts["sq"]) if parts["sq"] else None,
        )


def _candidate_outputs(
    x: torch.Tensor, cand_idx: torch.Tensor, expert_forward: ExpertFn, num_experts: int
) -> torch.Tensor:
    """tokens x m x hidden float32: each token's candidate experts' outputs (padding slots 0), every expert
    run once, on the tokens that have it as a candidate."""
    outputs = torch.zeros(x.shape[0], cand_idx.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(num_experts):
        token, slot = torch.nonzero(cand_idx == expert, as_tuple=True)
        if token.numel():
            outputs[token, slot] = expert_forward(x[token], expert).float()
    return outputs


def _split_aligned(inputs, offsets, rows_per_pass):
    """(rows of inputs, the same rows of offsets or None), in passes of at most rows_per_pass rows."""
    offsets = iter(offsets) if offsets is not None else None
    for chunk in inputs:
        rows = rows_per_pass or _rows_per_pass(chunk)
        d_chunk = next(offsets) if offsets is not None else None
        if d_chunk is not None and d_chunk.shape[0] != chunk.shape[0]:
            raise ValueError(f"an offset chunk has {d_chunk.shape[0]} rows for {chunk.shape[0]} inputs")
        d_parts = d_chunk.split(rows) if d_chunk is not None else [None] * -(-chunk.shape[0] // rows)
        yield from zip(chunk.split(rows), d_parts)


def _cat_padded(parts: list[torch.Tensor], width: int, fill) -> torch.Tensor:
    """Concatenate along tokens, padding the candidate dimensions (1, and 2 for Gram matrices) to width."""
    padded = []
    for part in parts:
        missing = width - part.shape[1]
        if missing:
            pad = [0, missing] * (part.dim() - 1)  # last dims first, as F.pad wants
            part = torch.nn.functional.pad(part, pad, value=fill)
        padded.append(part)
    return torch.cat(padded)


def _rows_per_pass(x: torch.Tensor) -> int:
    return 1024 if x.device.type == "cpu" else 16384


# Pattern tables are used while they stay small; beyond, subsets are scored directly.
MAX_PATTERN_SLOTS = 16
MAX_PATTERNS = 4096


class SubsetLoss:
    """Exact mean-per-token reconstruction loss of kept-expert subsets."""

    def __init__(self, stats: LayerStats, token_chunk: int = 16384, use_patterns: bool = True):
        self.stats = stats
        self.num_experts = stats.num_experts
        self.groups = stats.spec.group_limit.groups if stats.spec.grouped else 1  # keep sets take equally from each
        self.token_chunk = token_chunk
        everything = torch.ones(1, stats.num_experts, dtype=torch.bool)
        cand_kept, selected, kept_logits = self._selection(everything, slice(None))
        self._base_selected = selected[0]  # tokens x m
        self._base_weights = subset_weights(stats.cand_logits, cand_kept, selected, stats.spec, kept_logits)[0]
        m, k = stats.num_candidates, stats.spec.top_k
        self._patterns = None
        plain = not stats.spec.grouped and not stats.spec.needs_all_logits
        if use_patterns and plain and m <= MAX_PATTERN_SLOTS and math.comb(m, k) <= MAX_PATTERNS:
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
            per_token = selected.unsqueeze(1).expand(-1, len(cand_logits), -1)
            weights = subset_weights(cand_logits, per_token, per_token, self.stats.spec)
            losses.append(self._quadratic(weights, tokens).T)
        # slot_bits[e, t] = 2^j where expert e is token t's j-th candidate (exact in float32: m <= 16).
        cand_idx = self.stats.cand_idx
        slot_bits = torch.zeros(self.num_experts, len(cand_idx))
        slot_bits.scatter_(
            0, cand_idx.T, (2.0 ** torch.arange(m, dtype=torch.float32)).unsqueeze(1).expand(m, len(cand_idx))
        )
        return lookup, torch.cat(losses), slot_bits

    def min_keep(self) -> int:
        """Fewest experts these statistics score exactly (equally per group where routing is grouped)."""
        return self.stats.min_keep

    def _selection(
        self, keep: torch.Tensor, tokens, per_token: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(kept, selected: both subsets x tokens x m; every logit with removed ones at -inf, where needed).
        keep: subsets x n masks for all `tokens` (a slice or indices), or with per_token one mask per token
        (then a single subset dimension of 1)."""
        s = self.stats
        padded = torch.cat([keep, torch.zeros(len(keep), 1, dtype=torch.bool)], dim=1)  # padding never kept
        cand_idx = s.cand_idx[tokens]
        cand_kept = padded.gather(1, cand_idx).unsqueeze(0) if per_token else padded[:, cand_idx]
        kept_logits = None
        if s.logits is not None:
            removed = ~keep.unsqueeze(0) if per_token else ~keep.unsqueeze(1)
            kept_logits = s.logits[tokens].unsqueeze(0).masked_fill(removed, float("-inf"))
        cand_bias = None if s.bias is None else torch.cat([s.bias, s.bias.new_zeros(1)])[cand_idx]
        selected = select(
            s.cand_choice[tokens], cand_kept, s.spec, s.block, s.cand_logits[tokens], kept_logits, cand_bias
        )
        return cand_kept, selected, kept_logits

    def _weights(self, keep: torch.Tensor, tokens, per_token: bool = False) -> torch.Tensor:
        cand_kept, selected, kept_logits = self._selection(keep, tokens, per_token)
        return subset_weights(self.stats.cand_logits[tokens], cand_kept, selected, self.stats.spec, kept_logits)

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """keep: subsets x n bool. Returns float64 losses (subsets,)."""
        keep = keep.reshape(-1, self.num_experts).bool()
        self._check_keep(keep)
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

    def _check_keep(self, keep: torch.Tensor) -> None:
        """Statistics are exact for sets of at least min_keep experts, each group keeping its share."""
        per_group = keep.view(len(keep), self.groups, -1).sum(-1)
        if int(per_group.min()) < self.min_keep() // self.groups:
            count = int(keep.sum(1).min())
            share = f" ({self.min_keep() // self.groups} in each of {self.groups} groups)" if self.groups > 1 else ""
            raise ValueError(
                f"a subset keeps {count} experts; these statistics are exact only down to {self.min_keep()}{share}"
            )

    def removable(self, keep: torch.Tensor) -> torch.Tensor:
        """n bool: the kept experts whose removal leaves a set these statistics still score exactly."""
        keep = keep.reshape(self.num_experts).bool()
        surplus = keep.view(self.groups, -1).sum(-1) > self.min_keep() // self.groups
        return keep & surplus.repeat_interleave(self.num_experts // self.groups)

    def removal_losses(self, keep: torch.Tensor) -> torch.Tensor:
        """loss(keep minus e) for every removable expert e (inf elsewhere), exact, in one pass.

        What greedy elimination needs at each step. For plain top-k routing this costs about k subset
        scores instead of |keep|: removing e leaves a token's selection alone unless e is selected, and
        then only rescales its weights by c = 1 / (1 - p_e) (softmax without renormalisation, where p_e is
        e's probability among the kept experts) or not at all (every other rule). With the
        token's current loss L and q1 = a.G.a, q2 = a.G.a0, the rescaled loss is
        L + (c - 1)((c + 1) q1 - 2 q2). Tokens that select e get their new selection scored.
        Group-limited routing (removing e can move a token to other groups), sparsemixer (e's logit
        can sit in a selected expert's band) and softmax plus bias (removing e rescales every kept
        probability against its bias) score every child subset instead.
        """
        spec = self.stats.spec
        keep = keep.reshape(self.num_experts).bool()
        removable = self.removable(keep)
        if not removable.any():
            return torch.full((self.num_experts,), float("inf"), dtype=torch.float64)
        if spec.grouped and not spec.needs_all_logits:
            return self._grouped_removal_losses(keep, removable)
        if spec.grouped or spec.scoring is Scoring.SPARSEMIXER or spec.choice_depends_on_kept:
            return self._every_child_loss(keep, removable)
        return self._rescaled_removal_losses(keep, removable)

    def _every_child_loss(self, keep: torch.Tensor, removable: torch.Tensor) -> torch.Tensor:
        """removal_losses by scoring each child subset (keep minus one removable expert) in full."""
        n = self.num_experts
        experts = torch.nonzero(removable).flatten()
        children = keep.expand(len(experts), n).clone()
        children[torch.arange(len(experts)), experts] = False
        total = torch.full((n,), float("inf"), dtype=torch.float64)
        total[experts] = self(children)
        return total

    def _rescaled_removal_losses(self, keep: torch.Tensor, removable: torch.Tensor) -> torch.Tensor:
        """removal_losses for plain top-k routing: a token that does not select e keeps its selection, its
        weights unchanged or rescaled by c (see removal_losses); a token that selects e is scored afresh."""
        s, n, k = self.stats, self.num_experts, self.stats.spec.top_k
        total = torch.zeros(n, dtype=torch.float64)
        for start in range(0, s.num_tokens, self.token_chunk):
            tokens = slice(start, start + self.token_chunk)
            cand, gram = s.cand_idx[tokens], s.gram[tokens].double()
            base = self._base_weights[tokens].double()
            kept = keep[cand]  # tokens x m
            selected = select(s.cand_choice[tokens], kept[None], s.spec)[0]
            kept_logits = None
            if s.logits is not None:
                kept_logits = s.logits[tokens].masked_fill(~keep, float("-inf"))
            a = subset_weights(s.cand_logits[tokens], kept[None], selected[None], s.spec, _batch(kept_logits))[0]
            a = a.double()
            loss = self._token_loss(a - base, tokens, "tm,tmn,tn->t")
            # Tokens that do not select e: unchanged, or rescaled by c.
            if kept_logits is None:
                unselected = loss[:, None].expand(-1, n)
            else:
                lse = torch.logsumexp(kept_logits, dim=-1)
                p = torch.exp(s.logits[tokens].double() - lse[:, None].double()).masked_fill(~keep, 0.0)
                c = 1.0 / (1.0 - p).clamp_min(1e-300)
                q1 = torch.einsum("tm,tmn,tn->t", a, gram, a)[:, None]
                q2 = torch.einsum("tm,tmn,tn->t", a, gram, base)
                if s.offset_cross is not None:  # the compensating target's linear term rescales with a
                    q2 = q2 + (a * s.offset_cross[tokens].double()).sum(-1)
                q2 = q2[:, None]
                unselected = loss[:, None] + (c - 1.0) * ((c + 1.0) * q1 - 2.0 * q2)
            total += unselected.sum(0)
            # Tokens that select e: swap in their next kept candidate and score the new selection.
            slots = torch.nonzero(selected, as_tuple=True)[1].view(-1, k)  # tokens x k, ascending
            chosen = cand.gather(1, slots)
            total.index_add_(0, chosen.reshape(-1), -unselected.gather(1, chosen).reshape(-1))
            for j in range(k):
                without = kept.clone()
                without.scatter_(1, slots[:, j : j + 1], False)
                new_selected = select(s.cand_choice[tokens], without[None], s.spec)[0]
                new_logits = None
                if kept_logits is not None:  # masked afresh, not lse + log(1 - p): p can be ~1 for a selected expert
                    new_logits = kept_logits.scatter(1, chosen[:, j : j + 1], float("-inf"))
                new = subset_weights(
                    s.cand_logits[tokens], without[None], new_selected[None], s.spec, _batch(new_logits)
                )[0].double()
                total.index_add_(0, chosen[:, j], self._token_loss(new - base, tokens, "tm,tmn,tn->t"))
        total = total / s.num_tokens
        return total.masked_fill(~removable, float("inf"))

    def _grouped_removal_losses(self, keep: torch.Tensor, removable: torch.Tensor) -> torch.Tensor:
        """removal_losses for group-limited routing whose weights read only the selected experts: a child
        (keep minus e) differs from the parent only on the tokens for which e is relevant
        (`routing.group_relevant`); only those (token, e) pairs are scored, each with its own keep mask.
        A token's children are stacked (tokens x children x m) so each Gram matrix is read in place."""
        s, n = self.stats, self.num_experts
        total = torch.zeros(n, dtype=torch.float64)
        parent_total = 0.0
        for start in range(0, s.num_tokens, self.token_chunk):
            tokens = slice(start, start + self.token_chunk)
            cand_kept, selected, kept_logits = self._selection(keep[None], tokens)
            weights = subset_weights(s.cand_logits[tokens], cand_kept, selected, s.spec, kept_logits)
            parent = self._quadratic(weights, tokens)[0].double()
            parent_total += parent.sum().item()
            slots = group_relevant(s.cand_choice[tokens], cand_kept, selected, s.spec, s.block)[0]
            relevant = torch.zeros(len(parent), n + 1, dtype=torch.bool).scatter(1, s.cand_idx[tokens], slots)
            relevant = relevant[:, :n] & removable
            local, experts = torch.nonzero(relevant, as_tuple=True)  # sorted by token
            if not len(local):
                continue
            child = keep.expand(len(local), n).clone()
            child[torch.arange(len(local)), experts] = False
            child_delta = self._weights(child, local + start, per_token=True)[0] - self._base_weights[local + start]
            counts = relevant.sum(1)
            rank = torch.arange(len(local)) - (torch.cumsum(counts, 0) - counts)[local]
            stacked = torch.zeros(len(parent), int(counts.max()), s.num_candidates)
            stacked[local, rank] = child_delta
            child_loss = self._token_loss(stacked, tokens, "trm,tmn,trn->tr")[local, rank]
            total.index_add_(0, experts, child_loss.double() - parent[local])
        total = (parent_total + total) / s.num_tokens
        return total.masked_fill(~removable, float("inf"))

    def _quadratic(self, weights: torch.Tensor, tokens: slice) -> torch.Tensor:
        """The loss per subset and token: (a - a0)^T G (a - a0), minus 2 (a - a0).c plus ||d||^2 where the
        target is compensating."""
        delta = weights - self._base_weights[tokens].unsqueeze(0)
        return self._token_loss(delta, tokens, "stm,tmn,stn->st")

    def _token_loss(self, delta: torch.Tensor, tokens, contraction: str) -> torch.Tensor:
        """The loss of weight changes `delta` (any leading subset dimensions, then tokens x m; or
        tokens x children x m), in the dtype of delta. contraction: einsum of delta, the Gram tensor, delta."""
        s = self.stats
        loss = torch.einsum(contraction, delta, s.gram[tokens].to(delta.dtype), delta)
        if s.offset_cross is None:
            return loss
        cross = s.offset_cross[tokens].to(delta.dtype)
        sq = s.offset_sq[tokens].to(delta.dtype)
        if contraction.startswith("trm"):  # tokens x children x m
            return loss - 2 * torch.einsum("trm,tm->tr", delta, cross) + sq[:, None]
        return loss - 2 * (delta * cross).sum(-1) + sq

    def selection_counts(self) -> torch.Tensor:
        """How often each expert is among a token's originally selected experts."""
        return selection_counts(self.stats.cand_idx[self._base_selected], self.num_experts)

    def reap_saliency(self) -> torch.Tensor:
        """REAP (Cerebras, 2025): per expert, the mean over the tokens routed to it of its top-k-renormalised
        gate weight times the norm of its output. Norms come from the Gram diagonal. float64, n."""
        return self.reap_sums() / self.selection_counts().clamp_min(1)

    def reap_sums(self) -> torch.Tensor:
        """The numerator of `reap_saliency`, summed over this oracle's tokens (what ranks add up)."""
        selected = self._base_selected
        weights = self._base_weights.double() * selected
        weights = weights / weights.sum(-1, keepdim=True)
        norms = torch.diagonal(self.stats.gram, dim1=1, dim2=2).double().clamp_min(0).sqrt()
        routed = self.stats.cand_idx[selected]
        return torch.zeros(self.num_experts, dtype=torch.float64).index_add_(0, routed, (weights * norms)[selected])


def _batch(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor[None]
