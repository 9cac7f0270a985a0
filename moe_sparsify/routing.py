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
from enum import Enum

import torch


class Scoring(Enum):
    """What the router's logits become."""

    SOFTMAX = "softmax"  # float32, over the kept experts
    SIGMOID = "sigmoid"
    # PhiMoE: top-2 by logit, each weighted by a softmax over the experts within a relative band
    # `jitter` x 2 of it (`sparsemixer_weights`); those are its weights, as they are.
    SPARSEMIXER = "sparsemixer"


class Ranking(Enum):
    """What experts are ranked by to choose a token's top-k. A layer's selection bias (DeepSeek-V3's
    e_score_correction_bias), where it has one, is added to it; it never enters the weights."""

    SCORES = "scores"  # the scores (plus a bias that cannot reorder them as experts go: sigmoid)
    LOGITS = "logits"  # the logits plus the bias; the weights are still the scores (Kolibri)
    # The softmax the pruned model takes over the kept experts, plus the bias (ERNIE-4.5): the order
    # then depends on which experts are kept, not only on their order.
    BIASED_SOFTMAX = "biased softmax"


class Weighting(Enum):
    """How the selected experts' weights are formed (then multiplied by `scale`)."""

    SCORES = "scores"  # their scores as they are
    RENORMALIZED = "renormalized"  # their scores divided by their sum (Mixtral)
    # 1 each: the score scaled each selected expert's input, not its output (Llama 4: E_j(sigmoid(l_j) x));
    # the adapter's expert outputs include that scaling.
    UNIT = "unit"

    @classmethod
    def renormalized_if(cls, flag: bool) -> Weighting:
        """A config's `norm_topk_prob`-style switch: renormalised, or the scores as they are."""
        return cls.RENORMALIZED if flag else cls.SCORES


class GroupScore(Enum):
    """How a group is scored under group-limited routing; the value: how many of its best scores add up."""

    MAX = 1  # its best expert's score (DeepSeek-V2)
    TOP2 = 2  # the sum of its two best (DeepSeek-V3)


@dataclass(frozen=True)
class GroupLimit:
    """Group-limited routing (DeepSeek's n_group, topk_group): experts form `groups` contiguous equal
    groups; a token first picks the `chosen` groups with the best group score, then its top-k among
    their experts."""

    groups: int
    chosen: int
    score: GroupScore

    def __post_init__(self) -> None:
        if not 1 <= self.chosen < self.groups:
            raise ValueError(f"{self.chosen} of {self.groups} groups excludes none; GroupLimit.of gives None there")

    @classmethod
    def of(cls, groups: int | None, chosen: int | None, score: GroupScore) -> GroupLimit | None:
        """The limit a config's (n_group, topk_group) sets, or None where it excludes nothing."""
        groups, chosen = groups or 1, chosen or 1
        return cls(groups, chosen, score) if groups > 1 and chosen < groups else None


@dataclass(frozen=True)
class RoutingSpec:
    """How a model family turns router logits into (expert, weight) pairs.

    scale: multiplies the final weights (DeepSeek's routed_scaling_factor).
    group_limit: None for plain top-k.
    jitter: sparsemixer's band (PhiMoE's router_jitter_noise).
    renorm_eps: added to the sum renormalised sigmoid weights are divided by (LFM2-MoE: 1e-6).
    """

    top_k: int
    scoring: Scoring = Scoring.SOFTMAX
    weighting: Weighting = Weighting.RENORMALIZED
    ranking: Ranking = Ranking.SCORES
    scale: float = 1.0
    group_limit: GroupLimit | None = None
    jitter: float = 0.0
    renorm_eps: float = 0.0

    def __post_init__(self) -> None:
        # What the enums cannot say alone: the few pairs of choices that no family uses and the
        # objective does not score.
        if self.scoring is Scoring.SPARSEMIXER and (self.top_k != 2 or self.weighting is not Weighting.SCORES):
            raise ValueError("sparsemixer routes to exactly 2 experts, weighted as its scores say")
        if self.renorm_eps and (self.scoring, self.weighting) != (Scoring.SIGMOID, Weighting.RENORMALIZED):
            raise ValueError("renorm_eps is for renormalised sigmoid scores")
        if self.ranking is Ranking.BIASED_SOFTMAX and self.scoring is not Scoring.SOFTMAX:
            raise ValueError("a biased-softmax ranking needs softmax scores")
        if self.grouped and (self.ranking is Ranking.BIASED_SOFTMAX or self.scoring is Scoring.SPARSEMIXER):
            raise ValueError("group-limited routing is combined with sigmoid or plain softmax scores only")

    @property
    def grouped(self) -> bool:
        """Whether the group rule can exclude experts (otherwise routing is plain top-k)."""
        return self.group_limit is not None

    @property
    def renormalizes(self) -> bool:
        return self.weighting is Weighting.RENORMALIZED

    @property
    def needs_all_logits(self) -> bool:
        """Whether a selected expert's weight, or the selection itself, depends on experts outside it."""
        return self.scoring is Scoring.SPARSEMIXER or (
            self.scoring is Scoring.SOFTMAX and (self.choice_depends_on_kept or self.weighting is Weighting.SCORES)
        )

    @property
    def choice_depends_on_kept(self) -> bool:
        return self.ranking is Ranking.BIASED_SOFTMAX


def scores(logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Routing scores in float32 (removed experts: 0), the softmax taken over the kept experts only.
    Sparsemixer ranks by the logits themselves (removed: -inf); its weights come from `route`."""
    logits = logits.float()
    if spec.scoring is Scoring.SPARSEMIXER:
        return logits if keep is None else logits.masked_fill(~keep, float("-inf"))
    if spec.scoring is Scoring.SOFTMAX:
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(dim=-1)
    probs = logits.sigmoid()
    return probs if keep is None else probs.masked_fill(~keep, 0.0)


def choice_scores(
    probs: torch.Tensor,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """What experts are ranked by: the scores (or, with `logits` given, the logits) plus any selection
    bias; removed experts rank last."""
    ranked = probs if logits is None else logits.float()
    choice = ranked if bias is None else ranked + bias.float()
    return choice if keep is None else choice.masked_fill(~keep, float("-inf"))


def group_scores(choice: torch.Tensor, limit: GroupLimit) -> torch.Tensor:
    """... x groups x members choice scores (removed: -inf) -> ... x groups (too few kept: -inf)."""
    return choice.topk(limit.score.value, dim=-1).values.sum(-1)


def group_limited(choice: torch.Tensor, spec: RoutingSpec, groups: int | None = None) -> torch.Tensor:
    """Choice scores (... x n) with the experts outside each token's chosen groups set to -inf.
    `groups` overrides the spec's count where the columns are candidate blocks, not all experts."""
    limit = spec.group_limit
    grouped = choice.reshape(*choice.shape[:-1], groups or limit.groups, -1)
    return grouped.masked_fill(~chosen_groups(grouped, limit).unsqueeze(-1), float("-inf")).reshape(choice.shape)


def chosen_groups(grouped: torch.Tensor, limit: GroupLimit) -> torch.Tensor:
    """... x groups bool: the `limit.chosen` groups with the best group scores."""
    chosen = torch.topk(group_scores(grouped, limit), limit.chosen, dim=-1).indices
    return torch.zeros(grouped.shape[:-1], dtype=torch.bool, device=grouped.device).scatter_(-1, chosen, True)


def route(
    logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices), both tokens x top_k, as the (pruned) model computes them."""
    probs = scores(logits, spec, keep)
    choice = choice_scores(probs, keep, bias, logits if spec.ranking is Ranking.LOGITS else None)
    if spec.grouped:
        choice = group_limited(choice, spec)
    indices = torch.topk(choice, spec.top_k, dim=-1).indices
    if spec.scoring is Scoring.SPARSEMIXER:
        return sparsemixer_weights(probs, indices, spec.jitter), indices
    if spec.weighting is Weighting.UNIT:
        return torch.full(indices.shape, spec.scale, device=indices.device), indices
    weights = probs.gather(-1, indices)
    if spec.weighting is Weighting.RENORMALIZED:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    return weights * spec.scale, indices


def sparsemixer_weights(logits: torch.Tensor, top2: torch.Tensor, jitter: float) -> torch.Tensor:
    """PhiMoE's inference weights (models/phimoe `sparsemixer`, training=False), removed experts at -inf.

    The first expert's weight is a softmax over the experts whose relative gap to it is within
    2 x jitter; the second's the same around it, the first excluded. Computed as transformers does,
    op for op, so a pruned model's weights match bit for bit in float32."""
    weights = []
    masked = logits
    for slot in range(2):
        best = logits.gather(-1, top2[..., slot : slot + 1])
        factor = logits.abs().clamp(min=best)
        outside = ((best - logits) / factor) > (2 * jitter)
        gates = torch.softmax(masked.masked_fill(outside, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, top2[..., slot : slot + 1]))
        masked = torch.scatter(masked, -1, top2[..., slot : slot + 1], float("-inf"))
    return torch.cat(weights, dim=-1)


def candidate_count(num_experts: int, top_k: int, keep: int) -> int:
    """Removing n - r experts only promotes lower-ranked ones, so a token's new
    top-k lies in its original top-(k + n - r)."""
    return min(num_experts, top_k + num_experts - keep)


def group_candidate_count(num_experts: int, spec: RoutingSpec, keep: int) -> int:
    """Candidates per group under group-limited routing, where each group loses (n - r) / groups experts:
    a group's selected experts and the experts its group score reads lie in its top-(max(k, s) + removed)."""
    limit = spec.group_limit
    size, removed = num_experts // limit.groups, (num_experts - keep) // limit.groups
    return min(size, max(spec.top_k, limit.score.value) + removed)


def max_candidate_count(num_experts: int, spec: RoutingSpec, keep: int) -> int:
    """The most candidates a token can have (`candidate_experts`): its width before padded blocks go."""
    if spec.grouped:
        return group_candidate_count(num_experts, spec, keep) * spec.group_limit.groups
    return candidate_count(num_experts, spec.top_k, keep)


def group_keep_counts(num_experts: int, spec: RoutingSpec) -> list[int]:
    """The kept counts group-limited routing allows: an equal share per group (so the pruned model's
    groups are the original ones), at least what a group score reads, and enough experts in the chosen
    groups for top-k."""
    limit = spec.group_limit
    share_min = max(limit.score.value, -(-spec.top_k // limit.chosen))
    return [share * limit.groups for share in range(share_min, num_experts // limit.groups + 1)]


def candidate_experts(
    choice: torch.Tensor, spec: RoutingSpec, keep: int, probs: torch.Tensor | None = None
) -> tuple[torch.Tensor, int | None]:
    """Every expert a token can select in any pruned model keeping at least `keep` experts (equally
    per group under group-limited routing): (tokens x m expert ids, padding = n; group block width).

    Plain top-k: the token's top-(k + n - r), best first; block None.
    Group-limited: one block of `group_candidate_count` slots per group that can still be chosen,
    best first within it. A group cannot be chosen when at least `chosen` other groups score
    higher even after losing their best experts than it does before losing any; its block is left out
    (blocks are padded to the widest token), which spares its experts' outputs and Gram entries.
    Softmax plus bias (`probs` given): see `_biased_softmax_candidates`."""
    n = choice.shape[-1]
    if spec.choice_depends_on_kept:
        return _biased_softmax_candidates(probs, choice, spec.top_k, keep), None
    if not spec.grouped:
        return torch.topk(choice, candidate_count(n, spec.top_k, keep), dim=-1).indices, None
    limit = spec.group_limit
    per_group = group_candidate_count(n, spec, keep)
    removed, reads = (n - keep) // limit.groups, limit.score.value
    ranked = torch.topk(choice.view(-1, limit.groups, n // limit.groups), per_group, dim=-1)
    upper = ranked.values[..., :reads].sum(-1)  # tokens x groups: nothing removed
    lower = ranked.values[..., removed : removed + reads].sum(-1)  # its best `removed` gone
    surely_better = (lower.unsqueeze(1) > upper.unsqueeze(2)).sum(-1)  # [t, g]: groups h beating g always
    possible = surely_better < limit.chosen
    members = ranked.indices + torch.arange(limit.groups, device=choice.device).unsqueeze(-1) * (n // limit.groups)
    # Possible groups first (stable, in group order), then as few padded blocks as the chunk needs.
    order = torch.sort((~possible).int(), dim=-1, stable=True).indices
    members = members.gather(1, order.unsqueeze(-1).expand_as(members))
    members = members.masked_fill(~possible.gather(1, order).unsqueeze(-1), n)
    width = int(possible.sum(-1).max())
    return members[:, :width].reshape(len(choice), width * per_group), per_group


def _biased_softmax_candidates(probs: torch.Tensor, choice: torch.Tensor, top_k: int, keep: int) -> torch.Tensor:
    """Candidates where experts are ranked by softmax-over-kept + bias: tokens x m, padding n.

    Over the kept experts the probabilities are c p_i, with c = 1 / (kept mass) between 1 and c_max
    (the token's `removed` most probable experts gone). The order of i over j, c p_i + b_i > c p_j + b_j,
    is linear in c, so i outranks j for every allowed subset if it does at both ends. Expert j can be
    selected only if fewer than k + removed experts surely outrank it. Candidates are best first at c = 1."""
    n = probs.shape[-1]
    removed = n - keep
    mass = probs.topk(removed, dim=-1).values.sum(-1, keepdim=True) if removed else torch.zeros_like(probs[:, :1])
    # choice = p + b; at c_max: inf or nan where the mass rounds to 1, which prunes nothing.
    low, high = choice, probs / (1 - mass) + (choice - probs)
    surely = (low.unsqueeze(2) > low.unsqueeze(1)) & (high.unsqueeze(2) > high.unsqueeze(1))  # [t, i, j]
    possible = surely.sum(1) < top_k + removed
    order = torch.argsort(low, dim=-1, descending=True, stable=True)
    possible = possible.gather(1, order)
    # Possible ones first, in rank order; the rest become padding.
    shuffle = torch.sort((~possible).int(), dim=-1, stable=True).indices
    order = order.gather(1, shuffle).masked_fill(~possible.gather(1, shuffle), n)
    return order[:, : int(possible.sum(-1).max())]


def select(
    cand_choice: torch.Tensor,
    cand_kept: torch.Tensor,
    spec: RoutingSpec,
    block: int | None = None,
    cand_logits: torch.Tensor | None = None,
    kept_logits: torch.Tensor | None = None,
    cand_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """subsets x tokens x m bool: which candidates each subset's routing selects.

    cand_choice: tokens x m choice scores; cand_kept: subsets x tokens x m. Plain top-k candidates are
    in rank order, so the first k kept ones are selected. Group-limited candidates come in blocks of
    `block` slots, one group each (`candidate_experts`): the routing's group rule runs on the blocks.
    Softmax plus bias ranks by the softmax over each subset's kept experts (from `kept_logits`,
    subsets x tokens x n) plus the candidates' bias."""
    if spec.choice_depends_on_kept:
        lse = torch.logsumexp(kept_logits, dim=-1, keepdim=True)
        choice = (torch.exp(cand_logits.float().unsqueeze(0) - lse) + cand_bias).masked_fill(~cand_kept, float("-inf"))
        return torch.zeros_like(cand_kept).scatter_(-1, torch.topk(choice, spec.top_k, dim=-1).indices, True)
    if not spec.grouped:
        return cand_kept & (torch.cumsum(cand_kept.to(torch.int32), dim=-1) <= spec.top_k)
    choice = cand_choice.unsqueeze(0).masked_fill(~cand_kept, float("-inf"))
    limited = group_limited(choice, spec, groups=choice.shape[-1] // block)
    chosen = torch.topk(limited, spec.top_k, dim=-1).indices
    return torch.zeros_like(cand_kept).scatter_(-1, chosen, True)


def group_relevant(
    cand_choice: torch.Tensor, cand_kept: torch.Tensor, selected: torch.Tensor, spec: RoutingSpec, block: int
) -> torch.Tensor:
    """subsets x tokens x m bool: under group-limited routing, the kept candidates whose removal can change
    a token's routing: its selected experts, and in its chosen groups the experts the group score reads.
    Removing any other expert leaves every group score and the selection as they are."""
    choice = cand_choice.unsqueeze(0).masked_fill(~cand_kept, float("-inf"))
    grouped = choice.reshape(*choice.shape[:-1], choice.shape[-1] // block, block)
    best = grouped.topk(spec.group_limit.score.value, dim=-1).indices
    readers = torch.zeros(grouped.shape, dtype=torch.bool, device=choice.device).scatter_(-1, best, True)
    in_chosen = chosen_groups(grouped, spec.group_limit).unsqueeze(-1)
    return ((readers & in_chosen).reshape(choice.shape) & cand_kept) | selected


def subset_weights(
    cand_logits: torch.Tensor,
    cand_kept: torch.Tensor,
    selected: torch.Tensor,
    spec: RoutingSpec,
    kept_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights on each token's candidates for many subsets.

    cand_logits: tokens x m logits of the token's candidates (padding: -inf).
    cand_kept, selected: subsets x tokens x m, which candidates survive and which are selected (`select`).
    kept_logits: subsets x tokens x n, every logit with removed experts at -inf; needed where
        `spec.needs_all_logits` (softmax without renormalisation: a weight is p_j over all kept experts;
        sparsemixer: a weight is a softmax over the kept experts within its band).
    Returns subsets x tokens x m float32, zero off the selection.
    """
    logits = cand_logits.float().unsqueeze(0)
    if spec.weighting is Weighting.UNIT:
        return selected.float() * spec.scale
    if spec.needs_all_logits and kept_logits is None:
        raise ValueError(f"{spec.scoring.value} routing without renormalisation needs every kept logit")
    if spec.scoring is Scoring.SPARSEMIXER:
        top2 = torch.topk(kept_logits, 2, dim=-1).indices  # the selected pair, best first
        pair = sparsemixer_weights(kept_logits, top2, spec.jitter)
        rank = torch.cumsum(cand_kept.to(torch.int32), dim=-1)
        return torch.where(selected & (rank == 1), pair[..., :1], 0.0) + torch.where(
            selected & (rank == 2), pair[..., 1:], 0.0
        )
    if spec.scoring is Scoring.SOFTMAX:
        if spec.weighting is Weighting.RENORMALIZED:
            # p_j / sum_selected p == softmax over the selected logits.
            weights = torch.softmax(logits.masked_fill(~selected, float("-inf")), dim=-1)
        else:
            lse = torch.logsumexp(kept_logits, dim=-1, keepdim=True)
            weights = torch.exp(logits - lse) * selected
    else:
        weights = logits.sigmoid() * selected
        if spec.weighting is Weighting.RENORMALIZED:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    return weights * spec.scale


def selection_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How often each expert is among a token's chosen experts (int64, n)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)
