"""Neuron alignment before merging (recover_merge_align): permutations that leave experts unchanged,
alignment that finds them, and merges that stay guarded and export to what was computed."""

import copy
import json

import pytest
import torch
import yaml

from moe_sparsify.adapters import adapter_for
from moe_sparsify.layer_fit import LayerData, Recovery, layer_loss
from moe_sparsify.merge import merge_groups_, neuron_permutations
from moe_sparsify.neuron_align import CoActivation, best_permutation, check_alignable, permute_neurons
from moe_sparsify.recover import recover_layer

from .conftest import random_mixtral, save_with_tokenizer
from .test_merge import FAST, _cli, _keep_mask, _twin_experts_


def _stock_block_output(block, x: torch.Tensor) -> torch.Tensor:
    """The MoE block's own forward (transformers' code, not the adapter's) on one sequence of rows x."""
    with torch.no_grad():
        out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).squeeze(0)


def _permute_every_expert_(adapter, block, generator, skip: str | None = None) -> None:
    """In place: every expert's neurons in a random order (skip: leave that tensor as it is, a wrong path)."""
    tensors = adapter.expert_tensors(block)
    width = adapter.expert_hidden(block, torch.zeros(1, adapter.config.hidden_size), 0).shape[-1]
    with torch.no_grad():
        for e in range(adapter.num_experts):
            order = torch.randperm(width, generator=generator)
            for name, tensor in tensors.items():
                if name != skip:
                    tensor[e] = permute_neurons(block.experts, name, tensor[e].clone(), order)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "aria_text", "gpt_oss", "minimax_m3_vl_text"])
def test_a_neuron_permutation_leaves_every_expert_unchanged(family):
    """Checked through the stock forward of the block, in every layout merging supports: [gate; up] rows
    (Mixtral, Qwen2-MoE with shared experts), transposed (Aria), interleaved with biases (GPT-OSS), a
    clamped gate (MiniMax-M3). Permuting gate_up alone (down left as it was) is told apart."""
    from .test_families import build

    model, adapter = build(family)
    block = adapter.moe_block(adapter.decoder_layers(model)[adapter.moe_layers(model)[0]])
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = _stock_block_output(block, x)
    original, wrong = copy.deepcopy(block), copy.deepcopy(block)

    _permute_every_expert_(adapter, block, torch.Generator().manual_seed(1))
    _permute_every_expert_(adapter, wrong, torch.Generator().manual_seed(1), skip="down_proj")

    torch.testing.assert_close(_stock_block_output(block, x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_stock_block_output(wrong, x), expected, rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # each expert on its own too, not only the routed sum
        for e in range(adapter.num_experts):
            want = adapter.expert_forward(original, x, e)
            torch.testing.assert_close(adapter.expert_forward(block, x, e), want, rtol=1e-5, atol=1e-6)


def test_an_unknown_expert_tensor_is_refused():
    model = random_mixtral()
    experts = adapter_for(model.config).moe_block(model.model.layers[0]).experts
    with pytest.raises(ValueError, match="neuron layout is unknown.*recover_merge_align: false"):
        check_alignable(experts, ["gate_up_proj", "down_proj", "up_proj"])


def test_best_permutation_maximises_the_summed_correlation_exactly():
    """Against every permutation of 6 neurons, brute force."""
    import itertools

    correlation = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    best = max(itertools.permutations(range(6)), key=lambda p: sum(correlation[i, p[i]] for i in range(6)))
    assert best_permutation(correlation).tolist() == list(best)


def test_running_correlation_equals_pearson_over_all_tokens_at_once():
    """Sums over chunks against torch.corrcoef of the concatenated activations; a neuron that never
    varies (a dead one) correlates 0, not NaN."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 5, generator=generator), torch.randn(300, 5, generator=generator)
    b[:, 1] = 0.5 * a[:, 2] + 0.1 * b[:, 1]
    a[:, 4] = 0.0
    sums = CoActivation(5, torch.device("cpu"))
    for chunk_a, chunk_b in zip(a.split(70), b.split(70)):
        sums.add(chunk_a, chunk_b)
    expected = torch.nan_to_num(torch.corrcoef(torch.cat([a, b], 1).T.double())[:5, 5:], nan=0.0)
    torch.testing.assert_close(sums.correlation(), expected, rtol=1e-9, atol=1e-12)
    assert sums.correlation()[4].abs().max() == 0 and sums.correlation()[2, 1] > 0.9


def _with_permuted_copy(seed: int = 0, kept_expert: int = 2, copy_into: int = 5):
    """A random Mixtral whose expert `copy_into` (layer 0) is expert `kept_expert` with its neurons in a
    random order q, built here by indexing (Mixtral: gate_up_proj [n, 2I, H] = [gate; up], down_proj
    [n, H, I]). Returns (model, adapter, block, q)."""
    model = random_mixtral(seed=seed)
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    experts = block.experts
    width = experts.down_proj.shape[-1]
    q = torch.randperm(width, generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        experts.gate_up_proj[copy_into] = experts.gate_up_proj[kept_expert][torch.cat([q, q + width])]
        experts.down_proj[copy_into] = experts.down_proj[kept_expert][:, q]
    return model, adapter, block, q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aligning_an_expert_with_a_permuted_copy_recovers_the_permutation_and_the_merge_changes_nothing(seed):
    """Copy j of kept expert i holds neuron q[j] of i at position j; alignment must return argsort(q)
    exactly, and merging the aligned copy into i leaves i's weights as they were. Without alignment the
    same merge changes them (the test can fail)."""
    model, adapter, block, q = _with_permuted_copy(seed)
    x = torch.randn(400, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    groups = {2: [2, 5]}
    permutations = neuron_permutations(adapter, block, groups, [(x, None)])
    assert permutations[5].tolist() == torch.argsort(q).tolist()

    frequency = torch.tensor([1.0, 1, 3, 1, 1, 2, 1, 1], dtype=torch.float64)
    before = {n: t.detach().clone() for n, t in adapter.expert_tensors(block).items()}
    unaligned = copy.deepcopy(block)
    merge_groups_(adapter, block, groups, frequency, permutations)
    merge_groups_(adapter, unaligned, groups, frequency)
    for name, tensor in adapter.expert_tensors(block).items():
        torch.testing.assert_close(tensor, before[name], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(unaligned.experts.down_proj[2], before["down_proj"][2], rtol=1e-3, atol=1e-4)


SEQ = 20


@pytest.mark.parametrize("keep_ids", [(0, 2, 3, 5), (1, 4, 6, 7), (0, 1, 2, 3, 4, 5)])
def test_an_aligned_merge_never_raises_the_layer_loss(keep_ids):
    """Accepted or not, neither the fitted nor the held-back loss rises; refused leaves every parameter."""
    seed = keep_ids[1]
    model = random_mixtral(seed=seed)
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[1])
    keep = _keep_mask(keep_ids)
    x = torch.randn(24 * SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = adapter.routed_forward(block, x, None)
    data = LayerData.split(list(x.split(3 * SEQ)), list(y.split(3 * SEQ)), 0.25)
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    fit, held = layer_loss(adapter, block, keep, data.fit), layer_loss(adapter, block, keep, data.held)
    report = recover_layer(adapter, block, keep, data, Recovery(("merge",), merge_align=True))[0]
    assert layer_loss(adapter, block, keep, data.fit) <= fit * (1 + 1e-6)
    assert layer_loss(adapter, block, keep, data.held) <= held * (1 + 1e-6)
    if not report.accepted:
        for name, p in block.named_parameters():
            assert torch.equal(p, before[name]), name


def _permuted_twins_dir(tmp_path, family: str = "mixtral"):
    """Experts n/2..n-1 near copies of 0..n/2-1 with their neurons shuffled: the twins compute what their
    originals do, but averaged position by position they do not."""
    from .test_families import build

    model, adapter = build(family) if family != "mixtral" else (random_mixtral(layers=2), None)
    adapter = adapter or adapter_for(model.config)
    _twin_experts_(model, adapter)
    generator = torch.Generator().manual_seed(4)
    for index in adapter.moe_layers(model):
        block = adapter.moe_block(adapter.decoder_layers(model)[index])
        _permute_every_expert_(adapter, block, generator)
    return save_with_tokenizer(model, tmp_path / "twins")


def _prune_merge(source, output, config, align: bool):
    config.write_text(yaml.safe_dump({"recover_merge_align": align}))
    args = ["prune", "--model", source, "--keep", 4, "--recover", "merge", "--json", "--config", config, *FAST]
    result = _cli(*args, "-o", output)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_aligned_merges_of_shuffled_twins_are_accepted_and_the_export_reloads_equal(family, tmp_path):
    """Through the CLI: on twins with shuffled neurons the aligned merge is accepted in some layer where
    the plain one is not in every layer, the plan records the setting, and the export's stock reload
    equals the in-memory merged model (verified by prune; GPT-OSS: interleaved, transposed, biased)."""
    source = _permuted_twins_dir(tmp_path, family)
    aligned = _prune_merge(source, tmp_path / "aligned", tmp_path / "a.yaml", True)
    plain = _prune_merge(source, tmp_path / "plain", tmp_path / "p.yaml", False)
    assert aligned["recover"]["merge_align"] is True and plain["recover"]["merge_align"] is False
    assert aligned["verified_max_abs_logit_diff"] <= 1e-4

    def accepted(data):
        return [layer["methods"][0]["accepted"] for layer in data["recover"]["layers"]]

    def held_after(data):
        return sum(layer["methods"][0]["held_after"] for layer in data["recover"]["layers"])

    assert any(accepted(aligned))
    assert held_after(aligned) < held_after(plain)


def test_merge_align_must_be_a_boolean(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("recover_merge_align: 'yes'\n")
    result = _cli(
        "prune", "--model", "tiny", "--keep", 6, "--recover", "merge", "--config", config, "-o", tmp_path / "o"
    )
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "recover_merge_align" in lines[0], result.stderr


def test_an_aligned_merge_exported_reloads_in_stock_transformers_equal_to_the_in_memory_model(tmp_path):
    """Checked here by a stock reload and a forward of both (export_recovered), apart from export's own check."""
    from .test_recover import export_recovered

    source = _permuted_twins_dir(tmp_path)
    plan, *_ = export_recovered(source, tmp_path / "out", 32, keep=4, recover=["merge"], recover_merge_align=True)
    assert plan.options["recover"]["merge_align"] is True
