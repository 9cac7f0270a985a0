"""Search strategies: which experts of one layer to keep.

Every strategy has the same signature and sees only a loss oracle (an
`objective.SubsetLoss`: keep masks in, exact losses out, plus routing counts),
never the model. Register new ones with `@strategy("name")`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .choices import DEFAULT_MAX_SUBSETS, E2E_DEFAULTS
from .errors import UsageError

_SCORE_BATCH = 512


@dataclass(frozen=True)
class SearchResult:
    kept: tuple[int, ...]
    loss: float
    runner_up_loss: float | None  # best loss among other subsets the strategy scored
    subsets_scored: int
    divergence: float | None = None  # end-to-end strategies: the divergence of the kept set


# rescore(subsets) -> one end-to-end divergence per subset (lower is better).
Rescorer = Callable[[list[tuple[int, ...]]], list[float]]


class RoundScorer(Protocol):
    """The same divergence per calibration sequence, a round (a batch of sequences) at a time, for racing."""

    rounds: int
    look: int  # sequences between two looks at the race: a round may hold several (one batch per rank)

    def __call__(self, subsets: list[tuple[int, ...]], round: int) -> torch.Tensor:
        """subsets x the sequences of `round`, in calibration order: each sequence's mean divergence per token."""


@dataclass(frozen=True)
class SearchContext:
    layer: int
    seed: int = 0
    max_subsets: int = DEFAULT_MAX_SUBSETS
    beam: int = 1
    shortlist: int = E2E_DEFAULTS["e2e"]["e2e_shortlist"]
    rescore: Rescorer | None = None  # e2e: supplied by the caller that has the model
    # e2e racing (`e2e_race_z`): drop a subset once it is this many standard errors worse than the leader
    race_z: float | None = None
    race: RoundScorer | None = None  # with race_z, instead of rescore


Strategy = Callable[..., SearchResult]
STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str) -> Callable[[Strategy], Strategy]:
    def register(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class KeepSpace:
    """The subsets a layer may keep: `keep` of `num_experts`, the same share from each of `groups`
    contiguous routing groups (group-limited routing, where only equal shares keep the pruned model's
    routing exact; one group: any subset)."""

    num_experts: int
    keep: int
    groups: int = 1

    @classmethod
    def of(cls, oracle, keep: int) -> KeepSpace:
        return cls(oracle.num_experts, keep, getattr(oracle, "groups", 1))

    @property
    def share(self) -> int:
        return self.keep // self.groups

    def members(self, group: int) -> range:
        size = self.num_experts // self.groups
        return range(group * size, (group + 1) * size)

    def count(self) -> int:
        return math.comb(self.num_experts // self.groups, self.share) ** self.groups

    def describe(self) -> str:
        single = f"C({self.num_experts // self.groups}, {self.share})"
        return single if self.groups == 1 else f"{single}^{self.groups}"

    def subsets(self) -> list[tuple[int, ...]]:
        """Every allowed subset, in lexicographic order (groups are contiguous and ascending)."""
        per_group = [itertools.combinations(self.members(g), self.share) for g in range(self.groups)]
        return [sum(parts, ()) for parts in itertools.product(*per_group)]

    def best(self, values: list[float]) -> tuple[int, ...]:
        """The `share` experts with the highest values in each group (ties: lower id)."""
        kept = []
        for group in range(self.groups):
            kept += sorted(self.members(group), key=lambda e: (-values[e], e))[: self.share]
        return tuple(sorted(kept))

    def random(self, gen: torch.Generator) -> tuple[int, ...]:
        kept = []
        for group in range(self.groups):
            members = torch.tensor(self.members(group))
            kept += members[torch.randperm(len(members), generator=gen)[: self.share]].tolist()
        return tuple(sorted(kept))


def _masks(subsets: list[tuple[int, ...]], n: int) -> torch.Tensor:
    masks = torch.zeros(len(subsets), n, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        masks[row, list(subset)] = True
    return masks


def _score(oracle, subsets: list[tuple[int, ...]]) -> list[float]:
    losses: list[float] = []
    for start in range(0, len(subsets), _SCORE_BATCH):
        losses += oracle(_masks(subsets[start : start + _SCORE_BATCH], oracle.num_experts)).tolist()
    return losses


def _ranked(subsets: list[tuple[int, ...]], losses: list[float]) -> list[tuple[float, tuple[int, ...]]]:
    # Ties go to the lexicographically first subset, so results never depend on batching.
    return sorted(zip(losses, subsets))


def _result(ranked: list[tuple[float, tuple[int, ...]]], scored: int) -> SearchResult:
    loss, kept = ranked[0]
    runner_up = ranked[1][0] if len(ranked) > 1 else None
    return SearchResult(kept=kept, loss=loss, runner_up_loss=runner_up, subsets_scored=scored)


def _scored_single(oracle, kept: tuple[int, ...]) -> SearchResult:
    (loss,) = _score(oracle, [kept])
    return SearchResult(kept=kept, loss=loss, runner_up_loss=None, subsets_scored=1)


@strategy("exhaustive")
def exhaustive(oracle, keep: int, ctx: SearchContext) -> SearchResult:
    """All C(n, keep) subsets (the paper; per group under group-limited routing), scored from Gram statistics."""
    space = KeepSpace.of(oracle, keep)
    count = space.count()
    if count > ctx.max_subsets:
        raise UsageError(
            f"exhaustive search would score {space.describe()} = {count} subsets per layer, over the limit of "
            f"{ctx.max_subsets}; use --strategy greedy or raise max_subsets"
        )
    subsets = space.subsets()
    return _result(_ranked(subsets, _score(oracle, subsets)), len(subsets))


def _eliminate(oracle, keep: int, width: int) -> tuple[list[tuple[float, tuple[int, ...]]], int]:
    """Backward elimination keeping the `width` best sets per step; returns the last step's ranked
    children and how many subsets were scored. Each parent's children are scored in one pass
    (`removal_losses`), not one subset at a time; experts it cannot remove (a group at its share)
    come back as inf and are not children."""
    n = oracle.num_experts
    beam: list[tuple[int, ...]] = [tuple(range(n))]
    ranked: list[tuple[float, tuple[int, ...]]] = []
    scored = 0
    for _ in range(n - keep):
        children: dict[tuple[int, ...], float] = {}
        for parent in beam:
            losses = oracle.removal_losses(_masks([parent], n)[0]).tolist()
            for drop in parent:
                if math.isfinite(losses[drop]):
                    children[tuple(e for e in parent if e != drop)] = losses[drop]
        ranked = sorted((loss, child) for child, loss in children.items())
        scored += len(children)
        beam = [subset for _, subset in ranked[:width]]
    return ranked, scored


@strategy("greedy")
def greedy(oracle, keep: int, ctx: SearchContext) -> SearchResult:
    """Backward elimination on the exact loss: drop the expert whose removal hurts
    least, repeat; with beam > 1 keep the best `beam` sets at every step."""
    ranked, scored = _eliminate(oracle, keep, ctx.beam)
    if not ranked:  # keep == n
        return _scored_single(oracle, tuple(range(oracle.num_experts)))
    # Report the two best through the same scoring path as every other strategy, so a subset's
    # loss in the plan does not depend on which strategy found it.
    finalists = [subset for _, subset in ranked[:2]]
    return _result(_ranked(finalists, _score(oracle, finalists)), scored)


def shortlist(oracle, keep: int, ctx: SearchContext, size: int) -> tuple[list[tuple[float, tuple[int, ...]]], int]:
    """The `size` subsets with the lowest reconstruction loss, and how many subsets were scored:
    exactly (all subsets ranked) where exhaustive search is allowed, else the final beam of a
    greedy search as wide as `size`."""
    n = oracle.num_experts
    space = KeepSpace.of(oracle, keep)
    if space.count() <= ctx.max_subsets:
        subsets = space.subsets()
        return _ranked(subsets, _score(oracle, subsets))[:size], len(subsets)
    ranked, scored = _eliminate(oracle, keep, max(size, ctx.beam))
    return (ranked or [(0.0, tuple(range(n)))])[:size], scored


@dataclass(frozen=True)
class RaceOutcome:
    order: list[int]  # the last round's survivors, best mean divergence first (ties: the earlier index)
    divergence: float  # the winner's mean over every sequence it was scored on
    evaluations: int  # (subset, sequence) pairs scored


def race(subsets: list[tuple[int, ...]], score: RoundScorer, z: float) -> RaceOutcome:
    """Paired racing: every surviving subset is scored on the same sequences, a round at a time. At each
    look (every `score.look` sequences) the leader is the lowest mean divergence so far; a subset whose
    per-sequence differences to the leader have a mean above `z` standard errors is dropped. The race ends
    when one is left or the rounds run out. Without drops it ranks exactly as scoring every subset on
    every sequence; the looks fall on the same sequences however many processes score a round."""
    alive = list(range(len(subsets)))
    seen = torch.zeros(len(subsets), 0, dtype=torch.float64)  # NaN where a subset was already dropped
    evaluations = 0
    for round in range(score.rounds):
        got = score([subsets[i] for i in alive], round).double()
        evaluations += got.numel()
        rows = torch.full((len(subsets), got.shape[1]), math.nan, dtype=torch.float64)
        rows[alive] = got
        for start in range(0, got.shape[1], score.look):
            seen = torch.cat([seen, rows[:, start : start + score.look]], dim=1)
            last = round == score.rounds - 1 and start + score.look >= got.shape[1]
            order, divergence = _look(seen, alive, z, last)
            if last or len(order) == 1:
                return RaceOutcome(order, divergence, evaluations)
            rows[[i for i in alive if i not in order]] = math.nan
            alive = sorted(order)
    raise ValueError("a race needs at least one round of sequences")


def _look(seen: torch.Tensor, alive: list[int], z: float, last: bool) -> tuple[list[int], float]:
    """The survivors of one look, best mean first (ties: the earlier index), and the leader's mean; on the
    last look nobody is dropped."""
    table = seen[alive]
    means = table.mean(dim=1)
    ranking = sorted(range(len(alive)), key=lambda i: (means[i].item(), alive[i]))
    leader = ranking[0]
    differences = table - table[leader]
    if not last and differences.shape[1] > 1:
        margin = z * differences.std(dim=1) / math.sqrt(differences.shape[1])
        ranking = [i for i in ranking if i == leader or not differences[i].mean() > margin[i]]
    return [alive[i] for i in ranking], means[leader].item()


@strategy("e2e")
@strategy("e2e-fast")  # the same search; prune reads it at a horizon past layer 0 and races the shortlist
def end_to_end(oracle, keep: int, ctx: SearchContext) -> SearchResult:
    """Shortlist by exact reconstruction loss, then keep the subset whose pruned model's next-token
    distribution diverges least from the original's (ties: lower reconstruction loss); with `race_z`,
    by racing the shortlist (`race`) instead of scoring every subset on every sequence."""
    if (ctx.race if ctx.race_z is not None else ctx.rescore) is None:
        raise UsageError("the e2e strategies re-score subsets with the model; run them through `prune`")
    ranked, scored = shortlist(oracle, keep, ctx, ctx.shortlist)
    subsets = [subset for _, subset in ranked]
    if ctx.race_z is not None:
        outcome = race(subsets, ctx.race, ctx.race_z)
        order, divergence = outcome.order, outcome.divergence
    else:
        divergences = ctx.rescore(subsets)
        order = sorted(range(len(ranked)), key=lambda i: (divergences[i], i))
        divergence = divergences[order[0]]
    best = order[0]
    runner_up = ranked[order[1]][0] if len(order) > 1 else None
    return SearchResult(ranked[best][1], ranked[best][0], runner_up, scored, divergence)


@strategy("frequency")
def frequency(oracle, keep: int, ctx: SearchContext) -> SearchResult:
    """Baseline: keep the experts routed to most often (ties: lower id)."""
    return _scored_single(oracle, KeepSpace.of(oracle, keep).best(oracle.selection_counts().tolist()))


@strategy("reap")
def reap(oracle, keep: int, ctx: SearchContext) -> SearchResult:
    """Baseline: keep the experts with the highest REAP saliency (ties: lower id)."""
    return _scored_single(oracle, KeepSpace.of(oracle, keep).best(oracle.reap_saliency().tolist()))


@strategy("random")
def random(oracle, keep: int, ctx: SearchContext) -> SearchResult:
    """Baseline: a uniformly random subset, seeded per (seed, layer)."""
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.layer)
    return _scored_single(oracle, KeepSpace.of(oracle, keep).random(gen))


def resolve_strategy(name: str, num_experts: int, keep: int, max_subsets: int, groups: int = 1) -> str:
    """'auto': exhaustive while the allowed subsets are within the limit, greedy beyond (64-256 experts)."""
    if name != "auto":
        return name
    return "exhaustive" if KeepSpace(num_experts, keep, groups).count() <= max_subsets else "greedy"


def run_strategy(name: str, oracle, keep: int, ctx: SearchContext) -> SearchResult:
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](oracle, keep, ctx)
