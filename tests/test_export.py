"""Export streams the checkpoint, loads in stock transformers and matches the masked original."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moe_sparsify.adapters import adapter_for
from moe_sparsify.errors import FailedRun, UsageError
from moe_sparsify.export import PLAN_FILE, PROVENANCE_FILE, export_checkpoint
from moe_sparsify.plan import LayerPlan, Plan
from moe_sparsify.prune import model_identity

from .conftest import random_mixtral, save_with_tokenizer

KEPT = {0: [0, 2, 3, 5, 6, 7], 1: [1, 2, 3, 4, 6, 7]}


def _plan(model, kept=KEPT) -> Plan:
    adapter = adapter_for(model.config)
    return Plan(
        source="test",
        model=model_identity(model, adapter),
        strategy="exhaustive",
        mode="layerwise",
        seed=0,
        calibration={},
        versions={},
        layers=[LayerPlan(i, k, 0.0, None, 1) for i, k in kept.items()],
    )


def _fused_checkpoint(model, directory):
    """The 5.x in-memory layout on disk: stacked gate_up_proj / down_proj tensors."""
    save_with_tokenizer(model, directory)
    (directory / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_export_reloads_and_matches_the_masked_original(tmp_path, token_ids, layout):
    model = random_mixtral()
    source = tmp_path / "source"
    source.mkdir()
    if layout == "fused":
        _fused_checkpoint(model, source)
    else:
        save_with_tokenizer(model, source)
    adapter = adapter_for(model.config)
    plan = _plan(model)
    provenance = export_checkpoint(source, tmp_path / "out", plan, adapter, model, token_ids)
    assert provenance["config_changes"] == ["num_local_experts: 8 -> 6"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_local_experts == 6
    assert reloaded.num_experts == 6  # cached copy used by the auxiliary loss
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    with torch.no_grad(), adapter.pruned_view(model, plan.kept()):
        expected = model(input_ids=token_ids).logits
    assert (reloaded(input_ids=token_ids).logits - expected).abs().max() <= 1e-4
    # Kept experts keep their weights, in order, renumbered.
    src = model.model.layers[1].mlp.experts.down_proj[KEPT[1]]
    assert torch.equal(reloaded.model.layers[1].mlp.experts.down_proj.detach(), src.detach())
    assert (tmp_path / "out" / PLAN_FILE).is_file()
    assert json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["plan_sha256"] == plan.sha256()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out*"))


def test_sharded_source_keeps_its_shards(tmp_path, token_ids):
    model = random_mixtral()
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    export_checkpoint(source, tmp_path / "out", _plan(model), adapter_for(model.config), model, token_ids)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert all((tmp_path / "out" / shard).is_file() for shard in set(index["weight_map"].values()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_local_experts == 6


def test_refuses_existing_output_and_output_inside_source(random_model_dir, tmp_path, token_ids):
    model = random_mixtral()
    adapter = adapter_for(model.config)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="--overwrite"):
        export_checkpoint(random_model_dir, tmp_path / "taken", _plan(model), adapter, model, token_ids)
    with pytest.raises(UsageError, match="is inside .*, which this run reads"):
        export_checkpoint(random_model_dir, random_model_dir / "pruned", _plan(model), adapter, model, token_ids)


def test_corrupt_shard_fails_without_output(tmp_path, token_ids):
    model = random_mixtral()
    source = save_with_tokenizer(model, tmp_path / "source")
    (source / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(FailedRun, match="cannot read"):
        export_checkpoint(source, tmp_path / "out", _plan(model), adapter_for(model.config), model, token_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_per_layer_counts_are_refused_for_stock_configs(tmp_path, token_ids, random_model_dir):
    model = random_mixtral()
    plan = _plan(model, {0: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3]})
    with pytest.raises(UsageError, match="one count"):
        export_checkpoint(random_model_dir, tmp_path / "out", plan, adapter_for(model.config), model, token_ids)
    assert not (tmp_path / "out").exists()
