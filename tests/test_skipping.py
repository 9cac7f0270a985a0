"""Dynamic skipping: the rules, the threshold file, and a runtime that computes only the kept pairs."""

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moe_sparsify.adapters import adapter_for
from moe_sparsify.errors import UsageError
from moe_sparsify.models import load_model
from moe_sparsify.skipping import disable_skipping, enable_skipping, skip_fractions, skip_keep_mask
from moe_sparsify.thresholds import (
    LayerThreshold,
    SkipThresholds,
    load_thresholds,
    model_fingerprint,
    profile,
    routing_weights,
)

CPU = torch.device("cpu")


def test_ratio_rule_drops_the_second_expert_below_beta_times_the_first():
    weights = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    keep = skip_keep_mask(weights, 0.5, "ratio")
    assert keep.tolist() == [[True, True], [False, True], [True, False]]


def test_tail_rule_keeps_the_shortest_prefix_with_small_tail():
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.06, 0.04], [0.1, 0.6, 0.3]])
    keep = skip_keep_mask(weights, 0.25, "tail")
    # tails after top-1, top-2: [0.5, 0.2] -> 2 kept; [0.1, 0.04] -> 1; [0.4, 0.1] -> 2
    assert keep.tolist() == [[True, True, False], [True, False, False], [False, True, True]]
    assert skip_keep_mask(weights, 0.0, "tail").all()
    with pytest.raises(UsageError, match="top-2"):
        skip_keep_mask(weights, 0.5, "ratio")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load_model(tiny_dir, torch.float32)
    return model, adapter_for(model.config)


def _thresholds(model, adapter, beta_by_layer, rule="ratio"):
    layers = [LayerThreshold(i, b, 0.0) for i, b in beta_by_layer.items()]
    return SkipThresholds(model_fingerprint(model, adapter), rule, {"kind": "quantile", "value": 0.5}, layers)


def _median_thresholds(model, adapter, tokens):
    weights = routing_weights(model, adapter, tokens, batch_size=4, device=CPU)
    rule, layers = profile(weights, None, {"kind": "quantile", "value": 0.5}, adapter.top_k)
    return SkipThresholds(model_fingerprint(model, adapter), rule, {"kind": "quantile", "value": 0.5}, layers)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_zero_thresholds_are_the_stock_model(tiny, token_ids, implementation):
    model, adapter = tiny
    model.set_experts_implementation(implementation)
    try:
        with torch.no_grad():
            expected = model(input_ids=token_ids).logits
            enable_skipping(model, _thresholds(model, adapter, dict.fromkeys(range(4), 0.0)))
            got = model(input_ids=token_ids).logits
            disable_skipping(model)
            restored = model.config._experts_implementation
            after = model(input_ids=token_ids).logits
    finally:
        model.set_experts_implementation("grouped_mm")
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(after, expected)
    assert restored == implementation


def test_median_skipping_equals_the_brute_force_reference(tiny, token_ids):
    """Block by block (the reference computes every pair with a different kernel, so rounding differs
    and compounds over layers): the skipping block equals zeroing skipped weights and renormalising."""
    model, adapter = tiny
    thresholds = _median_thresholds(model, adapter, token_ids)
    seen = []
    hooks = [
        adapter.moe_block(layer).register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
        for layer in model.model.layers
    ]
    enable_skipping(model, thresholds)
    try:
        with torch.no_grad():
            got = model(input_ids=token_ids).logits
        realised = skip_fractions(model)
    finally:
        disable_skipping(model)
        for hook in hooks:
            hook.remove()
    skip = {e.layer: (e.beta, thresholds.rule) for e in thresholds.layers}
    with torch.no_grad():
        for index, (block, inputs, output) in enumerate(seen):
            reference = adapter.routed_forward(block, inputs, None, skip[index])
            assert (output - reference).abs().max() <= 1e-5
        tallies = {}
        with adapter.pruned_view(model, {}, skip, tallies):
            expected = model(input_ids=token_ids).logits
    assert (got - expected).abs().max() <= 1e-4
    # The reference counts what it skips as the runtime does (eval --plan --thresholds reports it).
    referenced = {i: 1 - kept / pairs for i, (kept, pairs) in tallies.items()}
    assert set(referenced) == set(realised) and referenced[0] == realised[0]
    assert all(referenced[i] == pytest.approx(realised[i], abs=0.01) for i in realised)
    # Profiled on the same tokens; layers after the first see inputs changed by earlier skipping.
    assert realised[0] == pytest.approx(thresholds.layers[0].skip_fraction, abs=0.006)
    for entry in thresholds.layers:
        assert realised[entry.layer] == pytest.approx(entry.skip_fraction, abs=0.05)


def test_only_surviving_pairs_reach_the_experts(tiny, token_ids):
    model, adapter = tiny
    rows = []
    stock = ALL_EXPERTS_FUNCTIONS["grouped_mm"]

    def counting(self, hidden_states, top_k_index, top_k_weights):
        rows.append(top_k_index.numel())
        return stock(self, hidden_states, top_k_index, top_k_weights)

    thresholds = _median_thresholds(model, adapter, token_ids)
    ALL_EXPERTS_FUNCTIONS["grouped_mm"] = counting  # a local override of this registry instance
    try:
        enable_skipping(model, thresholds)
        with torch.no_grad():
            model(input_ids=token_ids)
        fractions = skip_fractions(model)
    finally:
        disable_skipping(model)
        del ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    pairs = token_ids.numel() * adapter.top_k
    assert len(rows) == 4
    for layer, computed in enumerate(rows):
        assert computed == round(pairs * (1 - fractions[layer]))
        assert computed < 0.85 * pairs


def test_generate_with_skipping_batched_prefill_and_decode(tiny):
    model, adapter = tiny
    prompt = torch.randint(0, 2048, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model.generate(prompt, max_new_tokens=8, do_sample=False)
        enable_skipping(model, _thresholds(model, adapter, dict.fromkeys(range(4), 0.0)))
        try:
            same = model.generate(prompt, max_new_tokens=8, do_sample=False)
        finally:
            disable_skipping(model)
        thresholds = _median_thresholds(model, adapter, prompt.repeat(2, 4))
        enable_skipping(model, thresholds)
        try:
            skipped = model.generate(prompt, max_new_tokens=8, do_sample=False)
            assert set(skip_fractions(model)) == {0, 1, 2, 3}
        finally:
            disable_skipping(model)
    assert torch.equal(stock, same)
    # Every token decoded with skipping is the reference router's greedy choice on the same prefix.
    skip = {e.layer: (e.beta, thresholds.rule) for e in thresholds.layers}
    with torch.no_grad(), adapter.pruned_view(model, {}, skip):
        reference = model(input_ids=skipped[:, :-1]).logits.argmax(-1)
    assert torch.equal(skipped[:, prompt.shape[1] :], reference[:, prompt.shape[1] - 1 :])


def test_bfloat16_skipping_computes_what_the_reference_router_does(tiny_dir, token_ids):
    model, _ = load_model(tiny_dir, torch.bfloat16)
    adapter = adapter_for(model.config)
    thresholds = _median_thresholds(model, adapter, token_ids)
    with torch.no_grad():
        enable_skipping(model, thresholds)
        try:
            logits = model(input_ids=token_ids).logits
        finally:
            disable_skipping(model)
        with adapter.pruned_view(model, {}, {e.layer: (e.beta, thresholds.rule) for e in thresholds.layers}):
            reference = model(input_ids=token_ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference.float(), rtol=0.02, atol=0.02)


def test_thresholds_for_another_model_are_refused(tiny, tmp_path):
    model, adapter = tiny
    thresholds = _thresholds(model, adapter, dict.fromkeys(range(4), 0.3))
    path = thresholds.save(tmp_path / "t.yaml")
    assert load_thresholds(path) == thresholds
    pruned = model_fingerprint(model, adapter, {0: [0, 1, 2, 3, 4, 5]})
    with pytest.raises(UsageError, match="belong to another model"):
        load_thresholds(path).check_matches(pruned)
    with pytest.raises(UsageError, match="belong to another model"):
        enable_skipping(model, SkipThresholds(pruned, "ratio", {}, thresholds.layers))


def test_thresholds_naming_layers_the_model_lacks_are_refused_by_enable_skipping(tiny):
    """The library call checks the layer ids as `eval --thresholds` does: one threshold per MoE layer
    is not enough if they name other layers (here the last is relabelled past the model's end)."""
    model, adapter = tiny
    moe_layers = adapter.moe_layers(model)
    relabelled = dict.fromkeys([*moe_layers[:-1], moe_layers[-1] + 10], 0.3)
    with pytest.raises(UsageError, match="MoE layers are"):
        enable_skipping(model, _thresholds(model, adapter, relabelled))


def test_target_skip_and_quantile_statistics_set_the_skip_fraction(tiny, token_ids):
    model, adapter = tiny
    weights = routing_weights(model, adapter, token_ids, batch_size=4, device=CPU)
    _, first = profile(weights, None, {"kind": "target_skip", "value": 0.1}, 2)
    for entry in first:
        assert 0.08 <= entry.skip_fraction <= 0.1
    _, tail = profile(weights, "tail", {"kind": "quantile", "value": 0.5}, 2)
    assert all(0.2 < e.skip_fraction < 0.3 for e in tail)


def test_decode_sized_batches_take_the_direct_loop_and_stay_exact(tiny):
    model, adapter = tiny
    block = adapter.moe_block(model.model.layers[2])
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        stock = block(x)
        enable_skipping(model, _thresholds(model, adapter, dict.fromkeys(range(4), 0.0)))
        try:
            assert (block(x) - stock).abs().max() <= 1e-6
        finally:
            disable_skipping(model)
        thresholds = _thresholds(model, adapter, dict.fromkeys(range(4), 0.6))
        enable_skipping(model, thresholds)
        try:
            got = block(x)
            assert 0 < skip_fractions(model)[2] < 0.5
        finally:
            disable_skipping(model)
        reference = adapter.routed_forward(block, x, None, (0.6, "ratio"))
    assert (got - reference).abs().max() <= 1e-6
