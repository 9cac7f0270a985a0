"""Layer-wise and progressive modes against an independent recomputation."""

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.calibration.propagate import propagate
from moe_sparsify.config import Settings
from moe_sparsify.objective import SubsetLoss
from moe_sparsify.prune import layer_stats, plan_pruning
from moe_sparsify.search import SearchContext, exhaustive

from .conftest import assert_brute_force_e2e, random_mixtral

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


def test_e2e_with_every_subset_shortlisted_equals_brute_force_end_to_end_search():
    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(9))
    settings = Settings(model="test", keep=6, strategy="e2e", e2e_shortlist=28, e2e_samples=4, batch_size=2)
    plan = plan_pruning(model, adapter, settings, tokens, {}, device=CPU)[0]
    assert plan.mode == "progressive"
    assert_brute_force_e2e(
        plan, model, adapter, 6, lambda layer: torch.log_softmax(model(input_ids=tokens).logits.float(), -1)
    )


def test_e2e_needs_the_model():
    from moe_sparsify.errors import UsageError
    from moe_sparsify.search import run_strategy

    model = random_mixtral()
    adapter = adapter_for(model.config)
    x = torch.randn(32, model.config.hidden_size)
    with torch.no_grad():
        oracle = SubsetLoss(layer_stats(adapter, adapter.moe_block(model.model.layers[0]), [x], 6))
    with pytest.raises(UsageError, match="through `prune`"):
        run_strategy("e2e", oracle, 6, SearchContext(layer=0))


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_activations_offloaded_to_disk_give_the_same_plan(mode, tmp_path):
    from moe_sparsify.calibration.offload import ActivationStore

    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(5))
    settings = Settings(model="test", keep=5, mode=mode, batch_size=2)
    in_memory = plan_pruning(model, adapter, settings, tokens, {}, device=CPU)[0]
    store = ActivationStore(CPU, device_bytes=4096, cpu_bytes=4096, directory=str(tmp_path))
    offloaded = plan_pruning(model, adapter, settings, tokens, {}, device=CPU, activations=store)[0]
    assert store.peak["disk"] > 0 and store.peak["device"] <= 4096
    assert offloaded.dumps("json") == in_memory.dumps("json")
    store.close()
    assert not list(tmp_path.iterdir())


def test_spills_of_runs_killed_on_this_host_are_removed_by_the_next_run(tmp_path):
    """SIGKILL or the OOM killer runs no `finally`: the next run removes the dead run's spill directory,
    never a live run's or one from another machine sharing the directory."""
    import os
    import socket
    import subprocess
    import sys

    from moe_sparsify.calibration.offload import ActivationStore

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    host = socket.gethostname()
    names = {
        "dead": f"moe-sparsify-activations-{host}-{dead}-x1",
        "live": f"moe-sparsify-activations-{host}-{os.getppid()}-x2",
        "elsewhere": f"moe-sparsify-activations-{host}x-{dead}-x3",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.pt").write_bytes(b"spilled")
    with ActivationStore(CPU, device_bytes=0, cpu_bytes=0, directory=str(tmp_path)):
        own = [p.name for p in tmp_path.glob(f"moe-sparsify-activations-{host}-{os.getpid()}-*")]
        assert len(own) == 1
        assert {p.name for p in tmp_path.iterdir()} == {names["live"], names["elsewhere"], *own}
    assert {p.name for p in tmp_path.iterdir()} == {names["live"], names["elsewhere"]}


def test_layers_the_forward_never_runs_are_refused():
    from moe_sparsify.errors import FailedRun

    model = random_mixtral()
    model.config.num_hidden_layers = 1  # the forward now runs layer 0 only; layer 1 sits unused
    tokens = torch.randint(0, 100, (2, 16))
    with pytest.raises(FailedRun, match="ran 1 of its 2 decoder layers"):
        propagate(model, adapter_for(model.config), tokens, lambda step: None, batch_size=2, device=CPU)


def test_a_callback_that_raises_leaves_no_layer_visiting_the_device():
    """A refusal or an interrupt inside the per-layer callback still releases the layer it was given
    (a layer left on the compute device would hold its memory, or its copy, after prune gave up)."""
    from moe_sparsify.calibration.propagate import Resident
    from moe_sparsify.errors import FailedRun

    class Recording(Resident):
        def __init__(self, *args):
            super().__init__(*args)
            self.visits: list[int] = []

        def load_layer(self, index, device):
            self.visits.append(index)
            return super().load_layer(index, device)

        def release_layer(self, index):
            self.visits.remove(index)
            super().release_layer(index)

    model = random_mixtral(layers=2)
    adapter = adapter_for(model.config)
    residency = Recording(model, adapter)

    def refuse(step):
        raise FailedRun("stop")

    with pytest.raises(FailedRun, match="stop"):
        propagate(model, adapter, torch.randint(0, 100, (2, 16)), refuse, batch_size=2, device=CPU, residency=residency)
    assert residency.visits == []


def test_stored_calibration_gives_the_propagated_layerwise_plan_whatever_the_seq_len_setting(tmp_path):
    """The stored source takes its sequence length from the stored tokens, not from settings."""
    from moe_sparsify.calibration.store import CalibrationStore, CalibrationWriter

    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(5))
    writer = CalibrationWriter(tmp_path / "calib", overwrite=False)
    writer.begin({})
    writer.add_tokens(tokens)
    propagate(model, adapter, tokens, lambda step: writer.add_layer(step.index, step.inputs), batch_size=2, device=CPU)
    store = CalibrationStore(writer.commit({}))
    settings = Settings(model="test", keep=5, mode="layerwise", batch_size=2, seq_len=999)
    stored = plan_pruning(model, adapter, settings, store.token_ids(), {}, device=CPU, store=store)[0]
    propagated = plan_pruning(model, adapter, settings, tokens, {}, device=CPU)[0]
    assert stored.layers[0].loss > 0
    assert stored.dumps("json") == propagated.dumps("json")


def test_compensating_loss_is_the_original_output_against_the_pruned_layer_on_pruned_inputs():
    """The paper's progressive definition, end to end: the recorded loss of each layer's kept set is
    mean ||F(x_orig) - F'(x_pruned, C)||^2 with both streams recomputed independently (two plain runs)."""
    model = random_mixtral(layers=3)
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(6))
    plan = _plan(model, "compensating", 5, tokens)
    kept = plan.kept()
    original, pruned = {}, {}
    propagate(
        model, adapter, tokens, lambda s: original.setdefault(s.index, s.inputs) and None, batch_size=2, device=CPU
    )
    propagate(
        model,
        adapter,
        tokens,
        lambda s: pruned.setdefault(s.index, s.inputs) and kept[s.index],
        batch_size=2,
        device=CPU,
    )
    layers = adapter.decoder_layers(model)
    for layer in (1, 2):
        block = adapter.moe_block(layers[layer])
        keep = torch.zeros(8, dtype=torch.bool)
        keep[kept[layer]] = True
        x_orig, x_pruned = torch.cat(original[layer]), torch.cat(pruned[layer])
        with torch.no_grad():
            brute = ((adapter.routed_forward(block, x_pruned, keep) - block(x_orig[None])[0]) ** 2).sum(-1).mean()
        assert plan.layers[layer].loss == pytest.approx(brute.item(), rel=1e-4)
    progressive = _plan(model, "progressive", 5, tokens)
    assert progressive.layers[2].loss != pytest.approx(plan.layers[2].loss, rel=1e-3)  # another target


@pytest.mark.parametrize(
    ("samples", "processes", "batches_per_rank"), [(64, 2, 4), (60, 2, 4), (4, 2, None), (24, 2, None)]
)
def test_e2e_sequences_are_shared_evenly_between_ranks_or_refused(monkeypatch, samples, processes, batches_per_rank):
    """Each rank scores batches/world of its own sequences; together they must be exactly the batches one
    process scores (batch size 8: 64 or 60 samples are 8 batches, 4 each; 4 samples are one batch and
    24 are three, which two ranks cannot share, so the union would hold more sequences)."""
    import moe_sparsify.e2e as e2e_module
    from moe_sparsify.e2e import EndToEndRescorer
    from moe_sparsify.errors import UsageError

    monkeypatch.setattr(e2e_module, "world", lambda: (0, processes))
    model = random_mixtral()
    build = lambda: EndToEndRescorer(model, adapter_for(model.config), samples, 8, torch.device("cpu"))  # noqa: E731
    if batches_per_rank is None:
        with pytest.raises(UsageError, match="cannot share"):
            build()
    else:
        assert build().batches == batches_per_rank
