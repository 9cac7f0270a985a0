"""Router re-calibration and expert re-fitting: exact losses, never worse, guarded by held-back tokens."""

import json

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.recover import (
    LayerData,
    Recovery,
    _kept_outputs,
    _routed_loss,
    layer_loss,
    recalibrate_router,
    recover_layer,
    refit_experts,
)

from .conftest import random_mixtral

SEQ = 20


def _layer(keep_ids=(0, 2, 3, 5), sequences=48, seed=0):
    """A random Mixtral block pruned to keep_ids, whose target is the full block on the same inputs."""
    model = random_mixtral()
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = torch.randn(sequences * SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = adapter.routed_forward(block, x, None)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[list(keep_ids)] = True
    chunks_x, chunks_y = list(x.split(3 * SEQ)), list(y.split(3 * SEQ))
    return adapter, block, keep, LayerData.split(chunks_x, chunks_y, 0.25)


def _all(data):
    return data.fit + data.held


def test_holdout_is_the_tail_of_whole_batches():
    *_, data = _layer(sequences=12)
    assert sum(len(x) for x, _ in data.held) == 3 * SEQ  # 25 % of 12 sequences
    assert sum(len(x) for x, _ in data.fit) == 9 * SEQ
    with pytest.raises(ValueError, match="at least two"):
        LayerData.split([torch.zeros(SEQ, 4)], [torch.zeros(SEQ, 4)], 0.25)


def test_router_gram_loss_equals_the_reference_forward():
    """The re-calibration objective, from per-token scalars, equals ||F'(x, C) - y||^2 through the
    reference routed forward; a wrong kept set is told apart (the check can fail)."""
    adapter, block, keep, data = _layer()
    kept = torch.nonzero(keep).flatten().tolist()
    position = torch.zeros(8, dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    with torch.no_grad():
        gram_loss = _routed_loss(adapter, block, keep, position, _kept_outputs(adapter, block, kept, _all(data)))
    assert gram_loss.item() == pytest.approx(layer_loss(adapter, block, keep, _all(data)), rel=1e-5)
    other = torch.zeros(8, dtype=torch.bool)
    other[[1, 2, 3, 5]] = True
    assert layer_loss(adapter, block, other, _all(data)) != pytest.approx(gram_loss.item(), rel=1e-3)


@pytest.mark.parametrize("method", ["router", "refit"])
def test_recovery_never_raises_the_layer_loss_on_calibration_tokens(method):
    adapter, block, keep, data = _layer()
    before_fit, before_held = layer_loss(adapter, block, keep, data.fit), layer_loss(adapter, block, keep, data.held)
    step = recalibrate_router if method == "router" else refit_experts
    report = step(adapter, block, keep, data, Recovery((method,)))
    after_fit, after_held = layer_loss(adapter, block, keep, data.fit), layer_loss(adapter, block, keep, data.held)
    assert report.accepted  # a random block pruned by half has much to recover
    assert after_fit <= before_fit * (1 + 1e-6) and after_held < before_held
    assert report.fit_before == pytest.approx(before_fit, rel=1e-5)
    assert report.held_after == pytest.approx(after_held, rel=1e-5)


@pytest.mark.parametrize("method", ["router", "refit"])
def test_a_change_the_held_back_tokens_refuse_leaves_the_weights_untouched(method):
    """Held-back targets that no fit can approach (noise): the change is refused, bit for bit."""
    adapter, block, keep, data = _layer()
    data.held = [(x, torch.randn_like(y) * 100) for x, y in data.held]
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    report = recover_layer(adapter, block, keep, data, Recovery((method,)))[0]
    assert not report.accepted
    assert report.fit_after == report.fit_before
    for name, p in block.named_parameters():
        assert torch.equal(p, before[name]), name


def test_router_recalibration_changes_only_kept_router_rows():
    adapter, block, keep, data = _layer()
    experts_before = block.experts.down_proj.detach().clone()
    router_before = adapter.router_weight(block).detach().clone()
    assert recalibrate_router(adapter, block, keep, data, Recovery(("router",))).accepted
    router_after = adapter.router_weight(block)
    assert torch.equal(router_after[~keep], router_before[~keep])
    assert not torch.equal(router_after[keep], router_before[keep])
    assert torch.equal(block.experts.down_proj, experts_before)
    assert not router_after.requires_grad or router_after.grad is None


def test_refit_changes_only_kept_down_projections():
    adapter, block, keep, data = _layer()
    before = block.experts.down_proj.detach().clone()
    gate_up = block.experts.gate_up_proj.detach().clone()
    assert refit_experts(adapter, block, keep, data, Recovery(("refit",))).accepted
    assert torch.equal(block.experts.down_proj[~keep], before[~keep])
    assert not torch.equal(block.experts.down_proj[keep], before[keep])
    assert torch.equal(block.experts.gate_up_proj, gate_up)


# --- prune --recover end to end ---------------------------------------------------------------------------

FAST = ["--samples", "16", "--seq-len", "64"]


def _cli(*args):
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_prune_recover_exports_the_refitted_weights_it_verified(tmp_path):
    from safetensors.torch import load_file

    from moe_sparsify.models import bundled_model_dir

    out = tmp_path / "tiny-keep4"
    args = ["prune", "--model", "tiny", "--keep", 4, "--mode", "compensating", "--recover", "router,refit"]
    result = _cli(*args, "--output", out, "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified_max_abs_logit_diff"] <= 1e-4
    recover = data["recover"]
    assert recover["methods"] == ["router", "refit"]
    assert any(m["accepted"] for layer in recover["layers"] for m in layer["methods"])
    for method in (m for layer in recover["layers"] for m in layer["methods"] if m["accepted"]):
        assert method["end_to_end_after"] < method["end_to_end_before"]  # judged end to end, and kept for it
    source = load_file(bundled_model_dir("tiny") / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    for layer in recover["layers"]:
        kept = data["layers"][[lp["layer"] for lp in data["layers"]].index(layer["layer"])]["kept"]
        accepted = {m["method"] for m in layer["methods"] if m["accepted"]}
        prefix = f"model.layers.{layer['layer']}.block_sparse_moe"
        router_changed = not torch.equal(exported[f"{prefix}.gate.weight"], source[f"{prefix}.gate.weight"][kept])
        assert router_changed == ("router" in accepted)
        downs = [
            torch.equal(exported[f"{prefix}.experts.{new}.w2.weight"], source[f"{prefix}.experts.{old}.w2.weight"])
            for new, old in enumerate(kept)
        ]
        assert (not all(downs)) == ("refit" in accepted)
        for new, old in enumerate(kept):  # gate and up projections are never changed
            assert torch.equal(
                exported[f"{prefix}.experts.{new}.w1.weight"], source[f"{prefix}.experts.{old}.w1.weight"]
            )
    # The plan inside the checkpoint records the recovery, and cannot be re-applied to the source.
    plan = out / "moe_sparsify_plan.yaml"
    for command in (
        ["export", "--plan", plan, "--output", tmp_path / "again"],
        ["eval", "--model", "tiny", "--plan", plan],
    ):
        refused = _cli(*command)
        assert refused.exit_code == 2
        assert "made with --recover" in _one_error_line(refused)
    assert not (tmp_path / "again").exists()


def export_recovered(source, output, samples: int, **settings):
    """Plan `source` with recovery (exhaustive, 64-token windows) in memory, export it to `output`, and
    check the stock reload equals the in-memory recovered model on held-out tokens. Returns
    (plan, adapter, model, calibration tokens) for the caller to export again."""
    from transformers import AutoModelForCausalLM

    from moe_sparsify.calibration.sources import parse_sources
    from moe_sparsify.calibration.tokens import sample_windows
    from moe_sparsify.config import Settings
    from moe_sparsify.export import export_checkpoint
    from moe_sparsify.models import load_model
    from moe_sparsify.prune import plan_pruning

    model, tokenizer = load_model(source, torch.float32)
    adapter = adapter_for(model.config)
    tokens, manifest = sample_windows(tokenizer, parse_sources("bundled"), samples, 64, seed=0)
    settings = Settings(seq_len=64, batch_size=16, strategy="exhaustive", **settings)
    plan, _ = plan_pruning(model, adapter, settings, tokens, manifest, device=torch.device("cpu"))
    assert any(m["accepted"] for layer in plan.options["recover"]["layers"] for m in layer["methods"])
    export_checkpoint(source, output, plan, adapter, model, tokens[:2])
    fresh = sample_windows(tokenizer, parse_sources("bundled:heldout"), 2, 64, seed=1)[0]
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    with torch.no_grad(), adapter.pruned_view(model, plan.kept()):
        expected = model(input_ids=fresh).logits
    assert (reloaded(input_ids=fresh).logits - expected).abs().max() <= 1e-4
    return plan, adapter, model, tokens


def test_recovered_export_equals_the_in_memory_model_and_a_missed_tensor_is_caught(tmp_path, monkeypatch):
    """The re-fitted export reloads to the in-memory re-fitted model; had the export copied the source's
    down projections instead (a wrong path), its verification fails."""
    from moe_sparsify.adapters.base import MoEAdapter
    from moe_sparsify.errors import FailedRun
    from moe_sparsify.export import export_checkpoint
    from moe_sparsify.models import bundled_model_dir

    source = bundled_model_dir("tiny")
    plan, adapter, model, tokens = export_recovered(source, tmp_path / "ok", 64, keep=5, recover=["refit"])

    monkeypatch.setattr(MoEAdapter, "recovered_tensor", lambda *args, **kwargs: None)
    with pytest.raises(FailedRun, match="disagrees"):
        export_checkpoint(source, tmp_path / "wrong", plan, adapter, model, tokens[:2])
    assert not (tmp_path / "wrong").exists()


def test_bfloat16_recovery_verifies_against_the_refitted_model(tmp_path):
    args = ["prune", "--model", "tiny", "--keep", 6, "--recover", "refit", "--dtype", "bfloat16"]
    result = _cli(*args, "--output", tmp_path / "o", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified_max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--recover", "magic"], "'magic' is not one of 'merge', 'router' or 'refit'"),
        (["--recover", "refit", "--plan-only"], "--plan-only writes no weights"),
        (["--recover", "router", "--stream"], "--stream does not hold the layers"),
        (["--mode", "sideways"], "'sideways'"),
    ],
)
def test_recover_refuses_what_it_cannot_do(tmp_path, args, fragment):
    result = _cli("prune", "--model", "tiny", "--keep", 6, "--output", tmp_path / "out", *args, *FAST)
    assert result.exit_code == 2
    assert fragment in _one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_recover_refuses_a_quantized_source(tmp_path):
    import shutil

    from moe_sparsify.models import bundled_model_dir

    source = tmp_path / "quantized"
    shutil.copytree(bundled_model_dir("tiny"), source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (source / "config.json").write_text(json.dumps(config))
    result = _cli("prune", "--model", source, "--keep", 6, "--recover", "refit", "--output", tmp_path / "out", *FAST)
    assert result.exit_code == 2
    assert "quantized" in _one_error_line(result)


# --- the end-to-end guard ---------------------------------------------------------------------------------


def _stock_kl(model, tokens, kept: dict[int, list[int]]) -> float:
    """Mean per-token KL(original || pruned) from two whole-model forwards (no layer-by-layer path)."""
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=tokens).logits.float(), -1)
        with adapter_for(model.config).pruned_view(model, kept):
            q = torch.log_softmax(model(input_ids=tokens).logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_the_guard_equals_the_stock_forward_divergence_and_tells_a_wrong_kept_set_apart():
    """The guard's KL, run from a layer's cached inputs through the later layers, equals the KL of two
    stock forwards of the whole model on the held-back batches; judging another kept set differs."""
    from moe_sparsify.calibration.propagate import propagate
    from moe_sparsify.guard import EndToEndGuard

    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (6, 24), generator=torch.Generator().manual_seed(1))
    held = range(1, 3)  # batches of 2 sequences: the last two
    guard, judged = EndToEndGuard(model, adapter, torch.device("cpu")), {}

    def on_layer(step):
        if step.index == 1:
            judged["right"] = guard.for_layer(step, [0, 2, 3, 5, 6, 7], held)()
            judged["wrong"] = guard.for_layer(step, [1, 2, 3, 5, 6, 7], held)()
        return None

    propagate(model, adapter, tokens, on_layer, batch_size=2, device=torch.device("cpu"))
    expected = _stock_kl(model, tokens[2:], {1: [0, 2, 3, 5, 6, 7]})
    assert judged["right"] == pytest.approx(expected, rel=1e-4)
    assert judged["wrong"] != pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("method", ["router", "refit"])
@pytest.mark.parametrize(("divergences", "kept"), [((1.0, 0.5), True), ((1.0, 1.5), False)])
def test_a_change_the_layer_accepts_is_kept_only_where_the_end_to_end_divergence_falls(divergences, kept, method):
    """A change the layer losses accept is undone, bit for bit, when the judge says the model got worse."""
    adapter, block, keep, data = _layer()
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    judged = iter(divergences)
    report = recover_layer(adapter, block, keep, data, Recovery((method,)), judge=lambda: next(judged))[0]
    assert report.fit_after < report.fit_before  # the layer guard accepted it
    assert report.accepted == kept
    assert (report.end_to_end_before, report.end_to_end_after) == divergences
    unchanged = all(torch.equal(p, before[name]) for name, p in block.named_parameters())
    assert unchanged != kept


def test_recover_refuses_a_single_calibration_batch_before_loading(tmp_path):
    result = _cli(
        "prune",
        "--model",
        "tiny",
        "--keep",
        6,
        "--recover",
        "refit",
        "-o",
        tmp_path / "o",
        "--samples",
        8,
        "--batch-size",
        8,
        "--seq-len",
        64,
    )
    assert result.exit_code == 2
    assert "raise --samples or lower --batch-size" in _one_error_line(result)
    assert not (tmp_path / "o").exists()
