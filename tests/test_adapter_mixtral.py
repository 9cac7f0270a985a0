"""The adapter's routed forward is the stock block's forward, in every experts implementation."""

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.errors import UsageError
from moe_sparsify.routing import route

from .conftest import random_mixtral


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_routed_forward_equals_the_stock_block(implementation):
    model = random_mixtral()
    model.set_experts_implementation(implementation)
    adapter = adapter_for(model.config)
    x = torch.randn(3, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        block = adapter.moe_block(layer)
        with torch.no_grad():
            assert (adapter.routed_forward(block, x, None) - block(x)).abs().max() <= 1e-5


def test_route_equals_the_stock_router():
    model = random_mixtral()
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = torch.randn(50, model.config.hidden_size)
    with torch.no_grad():
        _, stock_weights, stock_idx = block.gate(x)
        weights, idx = route(adapter.router_logits(block, x), adapter.routing)
    assert torch.equal(idx, stock_idx)
    assert torch.allclose(weights, stock_weights, atol=1e-7)


def test_pruned_view_is_undone():
    model = random_mixtral()
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 2048, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adapter.pruned_view(model, {0: [0, 1], 1: [2, 3, 4]}):
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, during)


def test_unknown_architecture_lists_the_supported_ones():
    from transformers import LlamaConfig

    with pytest.raises(UsageError, match="supported: .*mixtral"):
        adapter_for(LlamaConfig())


def test_adapters_register_where_defined_and_a_claimed_type_is_refused():
    from moe_sparsify.adapters import ADAPTERS, MoEAdapter
    from moe_sparsify.adapters.mixtral import MixtralAdapter

    class Probe(MoEAdapter):
        model_types = ("probe_moe", "probe_moe_2")

    try:
        assert ADAPTERS["probe_moe"] is Probe and ADAPTERS["probe_moe_2"] is Probe

        class Unnamed(Probe):  # declares no types: claims none of its parent's
            pass

        assert ADAPTERS["probe_moe"] is Probe
        with pytest.raises(TypeError, match="both claim 'mixtral'"):

            class Clash(MoEAdapter):
                model_types = ("probe_moe_3", "mixtral")

        assert ADAPTERS["mixtral"] is MixtralAdapter and "probe_moe_3" not in ADAPTERS
    finally:
        for name in ("probe_moe", "probe_moe_2"):
            ADAPTERS.pop(name, None)
