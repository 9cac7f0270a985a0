"""The fast subset scores equal a brute-force masked forward, subset by subset."""

import itertools
from dataclasses import replace

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.objective import LayerStats, SubsetLoss
from moe_sparsify.prune import layer_stats
from moe_sparsify.routing import GroupLimit, GroupScore, Ranking, RoutingSpec, Scoring, Weighting, route
from moe_sparsify.search import SearchContext, exhaustive

from .conftest import random_mixtral


def _mask(subset, n):
    keep = torch.zeros(n, dtype=torch.bool)
    keep[list(subset)] = True
    return keep


def _stats(x, router, expert, spec, n, keep, bias=None):
    return LayerStats.collect(x.split(37), router, expert, spec, n, keep, bias)


@pytest.mark.parametrize("keep", [8, 7, 6, 5, 4, 2])
def test_mixtral_scores_equal_brute_force_for_every_subset(keep):
    model = random_mixtral()
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = torch.randn(300, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = block(x.unsqueeze(0))[0]  # the stock HF block: F(x)
        stats = layer_stats(adapter, block, x.split(37), keep)
        oracle = SubsetLoss(stats, token_chunk=64)
        subsets = list(itertools.combinations(range(8), keep))
        fast = oracle(torch.stack([_mask(s, 8) for s in subsets]))
        brute = torch.tensor(
            [
                ((adapter.routed_forward(block, x, _mask(s, 8)) - reference).double() ** 2).sum().item() / len(x)
                for s in subsets
            ],
            dtype=torch.float64,
        )
    scale = brute.max().clamp_min(1e-12)
    assert torch.allclose(fast, brute, rtol=1e-5, atol=1e-6 * scale.item())
    result = exhaustive(oracle, keep, SearchContext(layer=0))
    assert result.kept == subsets[int(brute.argmin())]
    if keep == 8:
        assert result.loss == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "spec",
    [
        RoutingSpec(top_k=3, weighting=Weighting.SCORES),
        RoutingSpec(top_k=3, weighting=Weighting.RENORMALIZED),
        RoutingSpec(top_k=2, scoring=Scoring.SIGMOID, weighting=Weighting.RENORMALIZED),
        RoutingSpec(top_k=2, scoring=Scoring.SIGMOID, weighting=Weighting.SCORES),
    ],
)
def test_other_routing_rules_score_exactly(spec):
    """Pure math: linear experts, every routing rule the adapters may declare."""
    gen = torch.Generator().manual_seed(3)
    n, d, keep = 7, 16, 4
    router_w = torch.randn(n, d, generator=gen)
    experts = torch.randn(n, d, d, generator=gen) / d**0.5
    x = torch.randn(200, d, generator=gen)

    def forward(keep_mask):
        weights, idx = route(x @ router_w.T, spec, keep_mask)
        outs = torch.einsum("td,tkod->tko", x, experts[idx])
        return (weights.unsqueeze(-1) * outs).sum(1)

    stats = _stats(x, lambda h: h @ router_w.T, lambda h, e: h @ experts[e].T, spec, n, keep)
    oracle = SubsetLoss(stats)
    subsets = list(itertools.combinations(range(n), keep))
    fast = oracle(torch.stack([_mask(s, n) for s in subsets]))
    full = forward(None)
    brute = torch.tensor(
        [((forward(_mask(s, n)) - full).double() ** 2).sum().item() / len(x) for s in subsets], dtype=torch.float64
    )
    assert torch.allclose(fast, brute, rtol=1e-5, atol=1e-7)


def test_scoring_below_the_candidate_bound_is_refused():
    model = random_mixtral()
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = torch.randn(20, model.config.hidden_size)
    with torch.no_grad():
        stats = layer_stats(adapter, block, x.split(37), 6)
    with pytest.raises(ValueError, match="exact only down to 6"):
        SubsetLoss(stats)(_mask(range(4), 8).unsqueeze(0))


def test_pattern_table_equals_direct_scoring():
    gen = torch.Generator().manual_seed(4)
    n, d = 8, 12
    router_w, experts = torch.randn(n, d, generator=gen), torch.randn(n, d, d, generator=gen)
    x = torch.randn(500, d, generator=gen)
    spec = RoutingSpec(top_k=2)
    stats = _stats(x, lambda h: h @ router_w.T, lambda h, e: h @ experts[e].T, spec, n, keep=4)
    masks = torch.stack([_mask(s, n) for s in itertools.combinations(range(n), 4)])
    table, direct = SubsetLoss(stats, token_chunk=128), SubsetLoss(stats, token_chunk=128, use_patterns=False)
    assert table._patterns is not None and direct._patterns is None
    assert torch.allclose(table(masks), direct(masks), rtol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        RoutingSpec(top_k=2),
        RoutingSpec(top_k=3, weighting=Weighting.SCORES, scale=1.5),
        RoutingSpec(top_k=2, scoring=Scoring.SIGMOID, scale=2.5),
        RoutingSpec(top_k=2, scoring=Scoring.SIGMOID, weighting=Weighting.SCORES),
    ],
)
def test_removal_losses_equal_scoring_each_smaller_subset(spec):
    gen = torch.Generator().manual_seed(5)
    n, d = 9, 12
    router_w, experts = torch.randn(n, d, generator=gen), torch.randn(n, d, d, generator=gen) / d**0.5
    x = torch.randn(300, d, generator=gen)
    stats = _stats(x, lambda h: h @ router_w.T, lambda h, e: h @ experts[e].T, spec, n, keep=5)
    oracle = SubsetLoss(stats, token_chunk=64)
    for kept in [range(n), (0, 1, 2, 4, 5, 7, 8), (1, 2, 3, 5, 6, 8)]:
        keep = _mask(kept, n)
        fast = oracle.removal_losses(keep)
        for e in range(n):
            if e in kept:
                expected = oracle((keep & ~_mask([e], n)).unsqueeze(0))[0]
                assert fast[e].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)
            else:
                assert fast[e] == float("inf")


V2_GROUPED = RoutingSpec(top_k=2, weighting=Weighting.SCORES, scale=1.5, group_limit=GroupLimit(3, 1, GroupScore.MAX))
V3_GROUPED = RoutingSpec(top_k=3, scoring=Scoring.SIGMOID, scale=2.5, group_limit=GroupLimit(4, 2, GroupScore.TOP2))


def _linear_layer(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    router_w = torch.randn(n, d, generator=gen)
    experts = torch.randn(n, d, d, generator=gen) / d**0.5
    x = torch.randn(240, d, generator=gen)
    bias = torch.randn(n, generator=gen) * 0.2
    return router_w, experts, x, bias


@pytest.mark.parametrize(
    "spec, n, keep",
    [
        (V2_GROUPED, 12, 6),  # DeepSeek-V2 group_limited_greedy: groups by their best probability
        (V2_GROUPED, 12, 9),
        (V3_GROUPED, 16, 8),  # DeepSeek-V3: sigmoid + correction bias, groups by their two best
        (V3_GROUPED, 16, 12),
        (RoutingSpec(top_k=2, ranking=Ranking.BIASED_SOFTMAX), 8, 4),  # ERNIE-4.5: bias on the kept softmax
        (RoutingSpec(top_k=3, ranking=Ranking.BIASED_SOFTMAX), 10, 6),
        (RoutingSpec(2, Scoring.SPARSEMIXER, Weighting.SCORES, jitter=0.1), 8, 4),  # PhiMoE
        (RoutingSpec(2, Scoring.SPARSEMIXER, Weighting.SCORES, jitter=0.01), 8, 5),
    ],
)
def test_group_limited_and_sparsemixer_routing_score_exactly(spec, n, keep):
    """Every allowed subset (an equal share per group) against a masked forward of the whole layer,
    the bias included: removing experts may move a token to other groups, and the candidates must
    cover every expert it can reach."""
    from moe_sparsify.search import KeepSpace

    router_w, experts, x, bias = _linear_layer(n, 16, seed=n + keep)
    bias = bias if spec.scoring is Scoring.SIGMOID or spec.ranking is Ranking.BIASED_SOFTMAX else None

    def forward(keep_mask):
        weights, idx = route(x @ router_w.T, spec, keep_mask, bias)
        return (weights.unsqueeze(-1) * torch.einsum("td,tkod->tko", x, experts[idx])).sum(1)

    stats = _stats(x, lambda h: h @ router_w.T, lambda h, e: h @ experts[e].T, spec, n, keep, bias)
    oracle = SubsetLoss(stats, token_chunk=100)
    subsets = KeepSpace(n, keep, oracle.groups).subsets()
    fast = oracle(torch.stack([_mask(s, n) for s in subsets]))
    full = forward(None)
    brute = torch.tensor(
        [((forward(_mask(s, n)) - full).double() ** 2).sum().item() / len(x) for s in subsets], dtype=torch.float64
    )
    assert torch.allclose(fast, brute, rtol=1e-5, atol=1e-7)
    if spec.grouped:  # the group rule really moved tokens: some subset changes a token's groups
        base_groups = route(x @ router_w.T, spec, None, bias)[1] // (n // spec.group_limit.groups)
        moved = any(
            not torch.equal(
                route(x @ router_w.T, spec, _mask(s, n), bias)[1] // (n // spec.group_limit.groups), base_groups
            )
            for s in subsets[:50]
        )
        assert moved
        assert (stats.cand_idx == n).any()  # and groups a token cannot reach were left out


@pytest.mark.parametrize("spec", [V3_GROUPED, replace(V2_GROUPED, group_limit=GroupLimit(4, 2, GroupScore.MAX))])
def test_removal_losses_keep_each_group_at_its_share(spec):
    """Greedy's one-pass child losses (only the tokens a removal can affect are rescored) equal scoring
    each child subset; experts of a group already at its share are not removable."""
    router_w, experts, x, bias = _linear_layer(16, 12, seed=7)
    bias = bias if spec.scoring is Scoring.SIGMOID else None
    stats = _stats(x, lambda h: h @ router_w.T, lambda h, e: h @ experts[e].T, spec, 16, 8, bias)
    oracle = SubsetLoss(stats, token_chunk=50)
    for kept in [range(16), [0, 1, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14]]:  # the second: group 0 at its share of 2
        keep = _mask(kept, 16)
        losses = oracle.removal_losses(keep)
        for e in range(16):
            if e in kept and not (len(kept) < 16 and e < 4):
                expected = oracle((keep & ~_mask([e], 16)).unsqueeze(0))[0]
                assert losses[e].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)
            else:
                assert losses[e] == float("inf")
    with pytest.raises(ValueError, match="2 in each of 4 groups"):
        oracle(_mask([0, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14], 16).unsqueeze(0))


COMPENSATING_SPECS = [
    (RoutingSpec(top_k=2), 8, 4),
    (RoutingSpec(top_k=3, weighting=Weighting.SCORES, scale=1.5), 9, 5),  # weights read every kept logit
    (RoutingSpec(top_k=2, scoring=Scoring.SIGMOID, scale=2.5), 8, 5),
    (V3_GROUPED, 16, 8),
]


def _compensating_case(spec, n, keep, seed):
    """A linear layer seen on the pruned model's inputs x', whose target is the original output F(x)."""
    router_w, experts, x, bias = _linear_layer(n, 16, seed)
    bias = bias if spec.scoring is Scoring.SIGMOID else None
    x_pruned = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))

    def forward(inputs, keep_mask):
        weights, idx = route(inputs @ router_w.T, spec, keep_mask, bias)
        return (weights.unsqueeze(-1) * torch.einsum("td,tkod->tko", inputs, experts[idx])).sum(1)

    target = forward(x, None)
    offsets = target - forward(x_pruned, None)
    stats = LayerStats.collect(
        x_pruned.split(37),
        lambda h: h @ router_w.T,
        lambda h, e: h @ experts[e].T,
        spec,
        n,
        keep,
        bias,
        rows_per_pass=16,  # passes smaller than the chunks: offsets must stay aligned with their rows
        offsets=offsets.split(37),
    )
    return stats, forward, x_pruned, target


@pytest.mark.parametrize("spec, n, keep", COMPENSATING_SPECS)
def test_compensating_target_scores_equal_a_masked_forward_against_the_original_output(spec, n, keep):
    """The paper's progressive loss ||F(x) - F'(x', C)||^2 from scalars equals the masked forward."""
    from moe_sparsify.search import KeepSpace

    stats, forward, x_pruned, target = _compensating_case(spec, n, keep, seed=11)
    oracle = SubsetLoss(stats, token_chunk=50)
    subsets = KeepSpace(n, keep, oracle.groups).subsets()
    fast = oracle(torch.stack([_mask(s, n) for s in subsets]))
    brute = torch.tensor(
        [((forward(x_pruned, _mask(s, n)) - target).double() ** 2).sum().item() / len(x_pruned) for s in subsets],
        dtype=torch.float64,
    )
    assert torch.allclose(fast, brute, rtol=1e-5, atol=1e-7)
    # The full layer on x' still misses the target: the loss of keeping everything is ||d||^2, not 0.
    everything = oracle(torch.ones(1, n, dtype=torch.bool))[0]
    assert everything.item() == pytest.approx(stats.offset_sq.double().mean().item(), rel=1e-6)
    assert everything > 0.01


@pytest.mark.parametrize("spec, n, keep", COMPENSATING_SPECS)
def test_compensating_removal_losses_equal_scoring_each_smaller_subset(spec, n, keep):
    stats, *_ = _compensating_case(spec, n, keep, seed=12)
    oracle = SubsetLoss(stats, token_chunk=50)
    keep_mask = torch.ones(n, dtype=torch.bool)
    losses = oracle.removal_losses(keep_mask)
    for e in torch.nonzero(oracle.removable(keep_mask)).flatten().tolist():
        expected = oracle((keep_mask & ~_mask([e], n)).unsqueeze(0))[0]
        assert losses[e].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)


def test_a_wrong_offset_is_caught_by_the_masked_forward():
    """The check above can fail: offsets from a shifted target do not match the original output."""
    spec, n, keep = RoutingSpec(top_k=2), 8, 4
    stats, forward, x_pruned, target = _compensating_case(spec, n, keep, seed=13)
    wrong = replace(stats, offset_cross=stats.offset_cross * 0.5)
    subset = _mask(range(keep), n)
    brute = ((forward(x_pruned, subset) - target).double() ** 2).sum().item() / len(x_pruned)
    assert SubsetLoss(stats)(subset[None])[0].item() == pytest.approx(brute, rel=1e-5)
    assert SubsetLoss(wrong)(subset[None])[0].item() != pytest.approx(brute, rel=1e-3)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(top_k=3, scoring=Scoring.SPARSEMIXER, weighting=Weighting.SCORES), "exactly 2"),
        (dict(top_k=2, scoring=Scoring.SPARSEMIXER), "exactly 2"),  # renormalised by default
        (dict(top_k=2, renorm_eps=1e-6), "renorm_eps"),  # softmax
        (dict(top_k=2, scoring=Scoring.SIGMOID, weighting=Weighting.SCORES, renorm_eps=1e-6), "renorm_eps"),
        (dict(top_k=2, scoring=Scoring.SIGMOID, ranking=Ranking.BIASED_SOFTMAX), "softmax scores"),
        (dict(top_k=2, ranking=Ranking.BIASED_SOFTMAX, group_limit=GroupLimit(2, 1, GroupScore.MAX)), "group"),
    ],
)
def test_routing_choices_no_family_makes_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        RoutingSpec(**fields)


def test_a_group_limit_that_excludes_nothing_is_plain_top_k():
    assert GroupLimit.of(None, None, GroupScore.TOP2) is None
    assert GroupLimit.of(4, 4, GroupScore.TOP2) is None
    assert GroupLimit.of(4, 2, GroupScore.TOP2) == GroupLimit(4, 2, GroupScore.TOP2)
    with pytest.raises(ValueError, match="excludes none"):
        GroupLimit(4, 4, GroupScore.TOP2)


def test_a_softmax_bias_the_spec_does_not_rank_by_is_refused():
    """Softmax scores plus a bias reorder the kept experts as others go; a spec ranking by the plain
    scores would search candidates in a fixed order and score subsets wrongly, so collecting refuses."""
    router_w, experts, x, bias = _linear_layer(8, 16, seed=11)
    wrong = RoutingSpec(top_k=2)
    with pytest.raises(ValueError, match="BIASED_SOFTMAX"):
        _stats(x, lambda h: h @ router_w.T, lambda h, e: h @ experts[e].T, wrong, 8, 4, bias)
