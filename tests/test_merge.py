"""--recover merge: removed experts averaged into kept ones by routing frequency, guarded, exported."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from moe_sparsify.adapters import adapter_for
from moe_sparsify.merge import merge_removed_experts
from moe_sparsify.recover import LayerData, Recovery, layer_loss, recover_layer

from .conftest import random_mixtral, save_with_tokenizer

SEQ = 20
KEEP = (0, 2, 3, 5)


def _inputs(model, sequences=24, seed=0):
    return torch.randn(sequences * SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _expected_merge(block, x: torch.Tensor, keep_ids, merge_by: str, weighting="frequency") -> dict[str, torch.Tensor]:
    """The merged experts computed here from the weights alone, apart from moe_sparsify: top-2 counts of
    a softmax router, mean SwiGLU outputs (or cosine of router-logit columns), nearest kept expert."""
    gate_up, down, router = block.experts.gate_up_proj.double(), block.experts.down_proj.double(), block.gate.weight
    logits = x.double() @ router.double().T
    chosen = logits.topk(2, dim=-1).indices
    frequency = torch.stack([(chosen == e).any(-1).sum() for e in range(8)]).double()
    if weighting == "uniform":  # a wrong path the test must tell apart
        frequency = torch.ones(8, dtype=torch.float64)
    half = gate_up.shape[1] // 2
    if merge_by == "output":
        means = []
        for e in range(8):
            h = x.double() @ gate_up[e].T
            means.append((F.silu(h[:, :half]) * h[:, half:] @ down[e].T).mean(0))
        profiles = torch.stack(means)
    else:
        profiles = F.normalize(logits.T, dim=1)
    merged = {"gate_up_proj": gate_up.clone(), "down_proj": down.clone()}
    for kept in keep_ids:
        members = [kept] + [
            r
            for r in range(8)
            if r not in keep_ids and min(keep_ids, key=lambda k: ((profiles[k] - profiles[r]).norm().item(), k)) == kept
        ]
        share = frequency[members] / frequency[members].sum()
        for name, source in (("gate_up_proj", gate_up), ("down_proj", down)):
            merged[name][kept] = sum(s * source[m] for s, m in zip(share, members))
    return merged


def _keep_mask(keep_ids):
    keep = torch.zeros(8, dtype=torch.bool)
    keep[list(keep_ids)] = True
    return keep


@pytest.mark.parametrize("merge_by", ["output", "router"])
def test_merged_weights_equal_a_frequency_weighted_average_computed_apart(merge_by):
    """The target is what the merged block computes, so the guard accepts; the kept experts then hold
    exactly the frequency-weighted average of their groups, and a uniform average is told apart."""
    model = random_mixtral()
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = _inputs(model)
    keep = _keep_mask(KEEP)
    fit_rows = 18 * SEQ  # LayerData.split holds back the last 2 of 8 batches (6 of 24 sequences)
    expected = _expected_merge(block, x[:fit_rows], KEEP, merge_by)
    merged_block = copy.deepcopy(block)
    with torch.no_grad():
        for name, value in expected.items():
            getattr(merged_block.experts, name).copy_(value.float())
        y = adapter.routed_forward(merged_block, x, keep)
    data = LayerData.split(list(x.split(3 * SEQ)), list(y.split(3 * SEQ)), 0.25)
    assert sum(len(c) for c, _ in data.fit) == fit_rows
    untouched = {name: getattr(block.experts, name)[~keep].clone() for name in expected}

    report = merge_removed_experts(adapter, block, keep, data, Recovery(("merge",), merge_by=merge_by))

    assert report.accepted and report.fit_after < report.fit_before
    for name, value in expected.items():
        got = getattr(block.experts, name).detach().double()
        torch.testing.assert_close(got[keep], value[keep], rtol=1e-5, atol=1e-6)
        assert torch.equal(getattr(block.experts, name)[~keep], untouched[name])  # removed rows are not exported
    uniform = _expected_merge(copy.deepcopy(merged_block), x[:fit_rows], KEEP, merge_by, weighting="uniform")
    assert not torch.allclose(expected["down_proj"][keep], uniform["down_proj"][keep], rtol=1e-3, atol=1e-4)


def test_merge_never_raises_the_layer_loss_on_calibration_tokens():
    """Whether or not the merge is accepted, neither the fitted nor the held-back loss rises; refused
    merges leave every parameter bit for bit."""
    for seed, keep_ids in ((0, KEEP), (1, (1, 4, 6, 7)), (2, (0, 1, 2, 3, 4, 5))):
        model = random_mixtral(seed=seed)
        adapter = adapter_for(model.config)
        block = adapter.moe_block(model.model.layers[1])
        keep = _keep_mask(keep_ids)
        x = _inputs(model, seed=seed)
        with torch.no_grad():
            y = adapter.routed_forward(block, x, None)
        data = LayerData.split(list(x.split(3 * SEQ)), list(y.split(3 * SEQ)), 0.25)
        before = {name: p.detach().clone() for name, p in block.named_parameters()}
        fit, held = layer_loss(adapter, block, keep, data.fit), layer_loss(adapter, block, keep, data.held)
        report = recover_layer(adapter, block, keep, data, Recovery(("merge",)))[0]
        assert layer_loss(adapter, block, keep, data.fit) <= fit * (1 + 1e-6)
        assert layer_loss(adapter, block, keep, data.held) <= held * (1 + 1e-6)
        if not report.accepted:
            for name, p in block.named_parameters():
                assert torch.equal(p, before[name]), name


def test_a_merge_the_held_back_tokens_refuse_leaves_the_weights_untouched():
    model = random_mixtral()
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    keep = _keep_mask(KEEP)
    x = _inputs(model)
    with torch.no_grad():
        merged = copy.deepcopy(block)
        for name, value in _expected_merge(block, x[: 18 * SEQ], KEEP, "output").items():
            getattr(merged.experts, name).copy_(value.float())
        y = adapter.routed_forward(merged, x, keep)  # the fitted tokens would accept this merge
    data = LayerData.split(list(x.split(3 * SEQ)), list(y.split(3 * SEQ)), 0.25)
    data.held = [(c, torch.randn_like(t) * 100) for c, t in data.held]
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    report = merge_removed_experts(adapter, block, keep, data, Recovery(("merge",)))
    assert not report.accepted and report.fit_after == report.fit_before
    for name, p in block.named_parameters():
        assert torch.equal(p, before[name]), name


# --- prune --recover merge end to end ------------------------------------------------------------------


def _twin_experts_(model, adapter) -> None:
    """Make experts n/2..n-1 near copies of 0..n/2-1 (every expert tensor and router row, plus 10 %
    noise): pruning drops one of each pair and merging the other into it helps, so merges are accepted."""
    generator = torch.Generator().manual_seed(3)
    half = adapter.num_experts // 2
    with torch.no_grad():
        for index in adapter.moe_layers(model):
            block = adapter.moe_block(adapter.decoder_layers(model)[index])
            for tensor in [*adapter.expert_tensors(block).values(), adapter.router_weight(block)]:
                noise = torch.randn(tensor[:half].shape, generator=generator) * tensor[:half].std() * 0.1
                tensor[half:] = tensor[:half] + noise


def _twinned_mixtral_dir(tmp_path):
    model = random_mixtral(layers=2)
    _twin_experts_(model, adapter_for(model.config))
    return save_with_tokenizer(model, tmp_path / "twinned")


FAST = ["--samples", "16", "--seq-len", "64"]


def _cli(*args):
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_merged_export_reloads_equal_to_the_in_memory_model_and_a_missed_tensor_is_caught(tmp_path, monkeypatch):
    """Per-expert w1/w3/w2 on disk: the export writes each kept expert's merged gate, up and down; the
    stock reload equals the in-memory merged model. Had the export copied the source's gate and up
    projections (only down_proj from memory, as refit does), its verification fails."""
    from safetensors.torch import load_file

    from moe_sparsify.adapters.base import MoEAdapter
    from moe_sparsify.errors import FailedRun
    from moe_sparsify.export import export_checkpoint

    from .test_recover import export_recovered

    source = _twinned_mixtral_dir(tmp_path)
    plan, adapter, model, tokens = export_recovered(source, tmp_path / "ok", 32, keep=4, recover=["merge"])
    written, original = load_file(tmp_path / "ok" / "model.safetensors"), load_file(source / "model.safetensors")
    layer = next(r["layer"] for r in plan.options["recover"]["layers"] if r["methods"][0]["accepted"])
    kept = plan.kept()[layer]
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    for projection in ("w1", "w3", "w2"):  # gate, up and down all carry the merge
        name = f"{prefix}.{{}}.{projection}.weight"
        assert any(not torch.equal(written[name.format(new)], original[name.format(e)]) for new, e in enumerate(kept))

    real = MoEAdapter.recovered_tensor

    def down_only(self, block, name, rule, whole_experts=False):
        return real(self, block, name, rule, whole_experts=False)

    monkeypatch.setattr(MoEAdapter, "recovered_tensor", down_only)
    with pytest.raises(FailedRun, match="disagrees"):
        export_checkpoint(source, tmp_path / "wrong", plan, adapter, model, tokens[:2])
    assert not (tmp_path / "wrong").exists()


def test_prune_recover_merge_router_refit_records_every_method_in_order(tmp_path):
    """On the trained model, through the CLI: merge runs first, every report keeps or lowers the fitted
    loss, the plan records merge_by, and the export verifies."""
    args = ["prune", "--model", "tiny", "--keep", 4, "--recover", "refit,merge,router", "--json", *FAST]
    result = _cli(*args, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified_max_abs_logit_diff"] <= 1e-4
    recover = data["recover"]
    assert recover["merge_by"] == "output"
    for layer in recover["layers"]:
        assert [m["method"] for m in layer["methods"]] == ["merge", "router", "refit"]
        for m in layer["methods"]:
            assert m["fit_after"] <= m["fit_before"] and m["held_after"] <= m["held_before"]


@pytest.mark.parametrize("family", ["qwen2_moe", "granitemoe", "gpt_oss"])
def test_merged_export_verifies_in_other_layouts(family, tmp_path):
    """Per-expert gate_proj/up_proj on disk (Qwen2-MoE, with shared experts), fused tensors under legacy
    names (Granite's input_linear/output_linear), fused transposed tensors with biases and interleaved
    gating (GPT-OSS): the export of merged experts reloads equal to the in-memory model."""
    from .test_families import build

    model, adapter = build(family)
    _twin_experts_(model, adapter)
    source = save_with_tokenizer(model, tmp_path / "source")
    args = ["prune", "--model", source, "--keep", 4, "--recover", "merge", "--json", *FAST]
    result = _cli(*args, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert any(m["accepted"] for layer in data["recover"]["layers"] for m in layer["methods"])
    assert data["verified_max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize(
    ("family", "args", "fragment"),
    [
        ("dbrx", ["--recover", "merge"], "cannot be averaged; --recover router only"),
        ("llama4_text", ["--recover", "merge,refit"], "computes its experts its own way"),
        ("mixtral", ["--recover", "merge", "--plan-only"], "--plan-only writes no weights"),
    ],
)
def test_merge_refuses_what_it_cannot_do(family, args, fragment, tmp_path):
    from .test_families import build

    model, _ = build(family)
    source = save_with_tokenizer(model, tmp_path / "source")
    result = _cli("prune", "--model", source, "--keep", 6, "-o", tmp_path / "out", *args, *FAST)
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
