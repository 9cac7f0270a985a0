"""Strategies against the exact oracle: greedy never beats exhaustive, keep=n is the identity."""

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.errors import UsageError
from moe_sparsify.objective import SubsetLoss
from moe_sparsify.prune import layer_stats
from moe_sparsify.routing import route
from moe_sparsify.search import SearchContext, run_strategy

from .conftest import random_mixtral


def _oracle(keep: int, seed: int = 0) -> SubsetLoss:
    model = random_mixtral(seed=seed)
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[1])
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        stats = layer_stats(adapter, block, [x], keep)
    return SubsetLoss(stats)


@pytest.mark.parametrize("keep", [6, 4, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_never_beats_exhaustive(keep, seed):
    oracle = _oracle(keep, seed)
    ctx = SearchContext(layer=0)
    best = run_strategy("exhaustive", oracle, keep, ctx)
    for beam in (1, 3):
        found = run_strategy("greedy", oracle, keep, SearchContext(layer=0, beam=beam))
        assert found.loss >= best.loss - 1e-12
        assert len(found.kept) == keep
    assert best.runner_up_loss >= best.loss


@pytest.mark.parametrize("name", ["exhaustive", "greedy", "reap", "frequency", "random"])
def test_keeping_every_expert_is_the_identity(name):
    result = run_strategy(name, _oracle(8), 8, SearchContext(layer=0))
    assert result.kept == tuple(range(8))
    assert result.loss == pytest.approx(0.0, abs=1e-12)


def test_frequency_keeps_the_most_routed_experts():
    oracle = _oracle(6)
    counts = oracle.selection_counts()
    assert counts.sum().item() == 2 * oracle.stats.num_tokens
    kept = run_strategy("frequency", oracle, 6, SearchContext(layer=0)).kept
    dropped = sorted(set(range(8)) - set(kept))
    assert max(counts[dropped]) <= min(counts[list(kept)])


def test_random_is_seeded_per_layer():
    oracle = _oracle(4)
    picks = {
        run_strategy("random", oracle, 4, SearchContext(layer=layer, seed=seed)).kept
        for layer in range(4)
        for seed in range(3)
    }
    again = run_strategy("random", oracle, 4, SearchContext(layer=2, seed=1)).kept
    assert again == run_strategy("random", oracle, 4, SearchContext(layer=2, seed=1)).kept
    assert len(picks) > 1


def test_exhaustive_refuses_above_the_subset_limit():
    with pytest.raises(UsageError, match="greedy"):
        run_strategy("exhaustive", _oracle(4), 4, SearchContext(layer=0, max_subsets=69))


def test_unknown_strategy_is_refused():
    with pytest.raises(UsageError, match="choose one of"):
        run_strategy("magic", _oracle(6), 6, SearchContext(layer=0))


def test_reap_saliency_equals_a_direct_computation():
    model = random_mixtral(seed=4)
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = torch.randn(200, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        oracle = SubsetLoss(layer_stats(adapter, block, [x], 6))
        weights, experts = route(adapter.router_logits(block, x), adapter.routing)
        total, count = torch.zeros(8, dtype=torch.float64), torch.zeros(8)
        for t in range(len(x)):
            for slot in range(2):
                e = experts[t, slot].item()
                total[e] += weights[t, slot].item() * adapter.expert_forward(block, x[t : t + 1], e).norm().item()
                count[e] += 1
    assert torch.allclose(oracle.reap_saliency(), total / count.clamp_min(1), rtol=1e-5)
    kept = run_strategy("reap", oracle, 6, SearchContext(layer=0)).kept
    saliency = oracle.reap_saliency()
    assert min(saliency[list(kept)]) >= max(saliency[sorted(set(range(8)) - set(kept))])


def test_auto_is_exhaustive_while_feasible_and_greedy_beyond():
    from moe_sparsify.search import resolve_strategy

    assert resolve_strategy("auto", 8, 4, 100_000) == "exhaustive"
    assert resolve_strategy("auto", 64, 32, 100_000) == "greedy"
    assert resolve_strategy("auto", 8, 4, 69) == "greedy"
    assert resolve_strategy("reap", 64, 32, 10) == "reap"
