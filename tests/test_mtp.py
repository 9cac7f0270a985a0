"""Multi-token-prediction layers on disk (DeepSeek-V3 / GLM-4.5: model.layers.{N}.* beyond
num_hidden_layers; Qwen3-Next style: mtp.*) are dropped from the export and their count set to 0."""

import json
import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moe_sparsify import export as export_module
from moe_sparsify.cli import app
from moe_sparsify.mtp import drop_mtp_config, mtp_tensor_filter

from .conftest import save_with_tokenizer
from .test_families import build

PRUNE = ["--keep", "6", "--samples", "8", "--seq-len", "32", "--json"]
# The parts of a DeepSeek-V3 MTP layer that a decoder layer lacks.
MTP_EXTRAS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def _with_mtp_layer(family: str, directory, count_key: str, prefix_of) -> set[str]:
    """Save `family` with one more decoder layer than its config declares, moved to the MTP place;
    returns the MTP tensor names."""
    model, _ = build(family, num_hidden_layers=4)
    save_with_tokenizer(model, directory)
    tensors = load_file(directory / "model.safetensors")
    mtp = {}
    for name in [n for n in tensors if n.startswith("model.layers.3.")]:
        mtp[prefix_of + name.removeprefix("model.layers.3.")] = tensors.pop(name)
    hidden = model.config.hidden_size
    for extra in MTP_EXTRAS:
        shape = (hidden, 2 * hidden) if extra == "eh_proj.weight" else (hidden,)
        mtp[prefix_of + extra] = next(iter(mtp.values())).new_ones(shape)
    save_file({**tensors, **mtp}, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update({"num_hidden_layers": 3, count_key: 1})
    config.pop("layer_types", None)  # a per-layer list would still describe 4 layers
    if "mlp_only_layers" in config:
        config["mlp_only_layers"] = [i for i in config["mlp_only_layers"] if i < 3]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return set(mtp)


LAYOUTS = {
    # DeepSeek-V3's own layout: the MTP layer is model.layers.{num_hidden_layers}.
    "deepseek_v3": ("deepseek_v3", "num_nextn_predict_layers", "model.layers.3."),
    # Qwen3-Next / Qwen3.5-MoE style: an mtp. prefix, counted by mtp_num_hidden_layers.
    "qwen3_moe": ("qwen3_moe", "mtp_num_hidden_layers", "mtp.layers.0."),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mtp_layers_are_dropped_and_the_export_is_consistent(layout, tmp_path):
    family, count_key, prefix = LAYOUTS[layout]
    source, out = tmp_path / "source", tmp_path / "out"
    mtp_names = _with_mtp_layer(family, source, count_key, prefix)
    assert any(re.search(r"\.experts\.7\.", n) for n in mtp_names), "the MTP layer carries all 8 experts"
    result = CliRunner().invoke(app, ["prune", "--model", str(source), *PRUNE, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified_max_abs_logit_diff"] <= 1e-4

    config = json.loads((out / "config.json").read_text())
    assert config[count_key] == 0 and config["num_hidden_layers"] == 3
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
        router_rows = {n: handle.get_slice(n).get_shape()[0] for n in names if n.endswith("mlp.gate.weight")}
    assert not names & mtp_names
    assert not [n for n in names if "mtp" in n or re.match(r"model\.layers\.([3-9]|\d\d)\.", n)]
    assert all(int(i) < 6 for i in re.findall(r"\.experts\.(\d+)\.", " ".join(names)))
    assert router_rows and set(router_rows.values()) == {6}
    provenance = json.loads((out / "moe_sparsify_provenance.json").read_text())
    assert provenance["mtp_layers"]["source_layers"] == 1
    assert provenance["mtp_layers"]["tensors_dropped"] == len(mtp_names)
    assert f"{count_key}: 1 -> 0" in provenance["config_changes"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_an_export_that_keeps_mtp_experts_fails_and_leaves_nothing(tmp_path, monkeypatch):
    """The expert-id check reads the written files, so a rewrite that forgets the MTP layer is caught
    even though stock transformers ignores that layer and logit verification cannot see it."""
    source, out = tmp_path / "source", tmp_path / "out"
    _with_mtp_layer("deepseek_v3", source, "num_nextn_predict_layers", "model.layers.3.")
    monkeypatch.setattr(export_module, "mtp_tensor_filter", lambda config: lambda name: False)
    result = CliRunner().invoke(app, ["prune", "--model", str(source), *PRUNE, "-o", str(out)])
    assert result.exit_code == 1
    assert "names expert" in result.stderr and "model.layers.3." in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_mtp_filter_and_config():
    config = {"num_hidden_layers": 61, "num_nextn_predict_layers": 1}
    is_mtp = mtp_tensor_filter(config)
    assert is_mtp("model.layers.61.eh_proj.weight") and is_mtp("model.layers.61.mlp.experts.255.w1.weight")
    assert is_mtp("mtp.layers.0.mlp.gate.weight") and is_mtp("model.mtp_layers.0.enorm.weight")
    assert not is_mtp("model.layers.60.mlp.gate.weight") and not is_mtp("lm_head.weight")
    assert not is_mtp("model.visual.blocks.70.mlp.fc1.weight")
    # Without a declared MTP layer, a layer beyond the count is not guessed to be one.
    assert not mtp_tensor_filter({"num_hidden_layers": 61})("model.layers.61.eh_proj.weight")
    assert drop_mtp_config(config) == ["num_nextn_predict_layers: 1 -> 0"] and config["num_nextn_predict_layers"] == 0
    assert drop_mtp_config({"num_nextn_predict_layers": 0}) == []
