"""Layer-wise and progressive modes against an independent recomputation."""

import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.calibration.propagate import propagate
from moe_sparsify.config import Settings
from moe_sparsify.objective import SubsetLoss
from moe_sparsify.prune import layer_stats, plan_pruning
from moe_sparsify.search import SearchContext, exhaustive

from .conftest import random_mixtral

CPU = torch.device("cpu")


def _plan(model, mode, keep, tokens):
    settings = Settings(model="test", keep=keep, mode=mode, batch_size=2)
    return plan_pruning(model, adapter_for(model.config), settings, tokens, {}, device=CPU)[0]


def _best_for_layer(model, adapter, tokens, layer, prefix_kept, keep):
    """Exhaustive search on `layer`'s inputs with the earlier layers pruned as given."""
    captured = {}

    def on_layer(step):
        if step.index == layer:
            stats = layer_stats(adapter, step.block, step.inputs, keep)
            captured["result"] = exhaustive(SubsetLoss(stats), keep, SearchContext(layer=layer))
        return prefix_kept.get(step.index)

    propagate(model, adapter, tokens, on_layer, batch_size=2, device=CPU)
    return captured["result"]


def test_progressive_layer_sees_the_pruned_prefix():
    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(5))
    plan = _plan(model, "progressive", 5, tokens)
    kept = plan.kept()
    for layer in (1, 2):
        prefix = {i: kept[i] for i in range(layer)}
        expected = _best_for_layer(model, adapter, tokens, layer, prefix, 5)
        assert tuple(kept[layer]) == expected.kept
        assert plan.layers[layer].loss == expected.loss


def test_layerwise_uses_original_inputs_and_matches_progressive_on_layer0():
    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(5))
    layerwise = _plan(model, "layerwise", 5, tokens)
    progressive = _plan(model, "progressive", 5, tokens)
    assert layerwise.layers[0] == progressive.layers[0]
    expected = _best_for_layer(model, adapter, tokens, 2, {}, 5)
    assert tuple(layerwise.kept()[2]) == expected.kept
    assert layerwise.layers[2].loss == expected.loss


def test_keeping_all_experts_changes_nothing():
    model = random_mixtral()
    tokens = torch.randint(0, 2048, (2, 16))
    plan = _plan(model, "progressive", 8, tokens)
    assert all(lp.kept == list(range(8)) and lp.loss == 0 for lp in plan.layers)
