"""Router re-calibration and expert re-fitting: exact losses, never worse, guarded by held-back tokens."""

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
    return adapter, block, keep, LayerData.split(chunks_x, chunks_y, SEQ, 0.25)


def _all(data):
    return data.fit + data.held


def test_holdout_is_the_tail_of_whole_sequences():
    *_, data = _layer(sequences=12)
    assert sum(len(x) for x, _ in data.held) == 3 * SEQ  # 25 % of 12 sequences
    assert sum(len(x) for x, _ in data.fit) == 9 * SEQ
    with pytest.raises(ValueError, match="two calibration sequences"):
        LayerData.split([torch.zeros(SEQ, 4)], [torch.zeros(SEQ, 4)], SEQ, 0.25)


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
