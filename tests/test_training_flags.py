"""A fine-tuned checkpoint's config.json often keeps training flags (output_router_logits: true, ...).
Every forward the project runs ignores them; the export keeps them as the user wrote them."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moe_sparsify.cli import app
from moe_sparsify.model_config import INFERENCE_FLAGS, load_config
from moe_sparsify.models import load_pretrained
from moe_sparsify.mtp import MTP_COUNT_KEYS

from .conftest import save_with_tokenizer
from .test_families import build

# What a training run leaves in config.json: the load-balancing loss on, every output collected,
# no KV cache, tuples instead of output objects.
TRAINED_FLAGS = {
    "output_router_logits": True,
    "output_attentions": True,
    "output_hidden_states": True,
    "use_cache": False,
    "return_dict": False,
}
# One family per routing kind: softmax top-k renormalised (mixtral), softmax without renormalisation
# plus a gated shared expert (qwen2_moe), sparsemixer (phimoe), top-k then softmax with router bias
# (gpt_oss), sigmoid with group-limited selection (deepseek_v3), a language model inside a
# vision-language config whose flags live in text_config (qwen3_vl_moe).
FAMILIES = ["mixtral", "qwen2_moe", "phimoe", "gpt_oss", "deepseek_v3:grouped", "qwen3_vl_moe_text"]
ARGS = ["--keep", "6", "--samples", "8", "--seq-len", "32", "--json"]


def _with_trained_flags(directory, flags=TRAINED_FLAGS):
    config = json.loads((directory / "config.json").read_text())
    for section in [config] + [config[k] for k in ("text_config",) if k in config]:
        section.update(flags)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return config


def _run(*args):
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_flags_prune_export_and_verify_like_the_plain_checkpoint(family, tmp_path):
    model, _ = build(family)
    plain = save_with_tokenizer(model, tmp_path / "plain")
    flagged = save_with_tokenizer(model, tmp_path / "flagged")
    written = _with_trained_flags(flagged)
    expected = _run("prune", "--model", plain, *ARGS, "-o", tmp_path / "plain-out")
    got = _run("prune", "--model", flagged, *ARGS, "-o", tmp_path / "out")
    assert got["verified_max_abs_logit_diff"] <= 1e-4
    assert [lp["kept"] for lp in got["layers"]] == [lp["kept"] for lp in expected["layers"]]
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert _without_counts(exported) == _without_counts(written), "only the expert and MTP counts may change"
    for section in [exported] + [exported[k] for k in ("text_config",) if k in exported]:
        assert {k: section[k] for k in TRAINED_FLAGS} == TRAINED_FLAGS, "the user's flags travel unchanged"


def _without_counts(config: dict) -> dict:
    counts = ("num_experts", "num_local_experts", "n_routed_experts", *MTP_COUNT_KEYS)
    return {k: _without_counts(v) if isinstance(v, dict) else v for k, v in config.items() if k not in counts}


def test_trained_flags_stream_eval_and_skip_profile(tmp_path, text):
    """Streamed prune, skip-profile and eval on a flagged checkpoint: the plan applied in memory and the
    exported checkpoint give the same thresholds and the same perplexity with skipping on."""
    model, _ = build("mixtral")
    window = ["--window", "64", "--stride", "32"]  # the tiny config holds 128 positions
    profile = ["--samples", "8", "--seq-len", "32", "--json"]
    flagged = save_with_tokenizer(model, tmp_path / "flagged")
    _with_trained_flags(flagged)
    out = tmp_path / "out"
    streamed = _run("prune", "--model", flagged, *ARGS, "--stream", "-o", out)
    assert streamed["verified_max_abs_logit_diff"] <= 1e-4
    plan = out / "moe_sparsify_plan.yaml"
    in_memory, exported = tmp_path / "in-memory.json", tmp_path / "exported.json"
    _run("skip-profile", "--model", flagged, "--plan", plan, *profile, "-o", in_memory)
    _run("skip-profile", "--model", out, *profile, "-o", exported)
    betas = [[layer["beta"] for layer in json.loads(path.read_text())["layers"]] for path in (in_memory, exported)]
    assert betas[1] == pytest.approx(betas[0], rel=1e-5) and len(betas[0]) == len(streamed["layers"])
    pruned = _run("eval", "--model", flagged, "--plan", plan, "--thresholds", in_memory, *text, *window, "--json")
    skipped = _run("eval", "--model", out, "--thresholds", exported, *text, *window, "--json")
    assert skipped["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-4)
    assert len(skipped["skip_fraction"]) == len(betas[0]) and 0 < min(skipped["skip_fraction"].values())


def test_load_config_neutralises_flags_in_nested_configs(tmp_path):
    model, _ = build("qwen3_vl_moe_text")
    directory = save_with_tokenizer(model, tmp_path / "m")
    _with_trained_flags(directory)
    config = load_config(directory)
    for section in (config, config.text_config):
        assert {k: getattr(section, k) for k in INFERENCE_FLAGS if hasattr(section, k)} == {
            k: v for k, v in INFERENCE_FLAGS.items() if hasattr(section, k)
        }
    assert config.text_config.output_router_logits is False


def test_output_attentions_in_config_does_not_switch_attention_kernels(tmp_path):
    """A config read with output_attentions true picks eager attention; the loaded model must not."""
    model, _ = build("mixtral")
    plain = save_with_tokenizer(model, tmp_path / "plain")
    flagged = save_with_tokenizer(model, tmp_path / "flagged")
    _with_trained_flags(flagged)
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = load_pretrained(flagged, torch.float32)
    assert loaded.config._attn_implementation == load_pretrained(plain, torch.float32).config._attn_implementation
    with torch.no_grad():
        out = loaded(input_ids=ids)
    assert out.attentions is None and out.hidden_states is None and out.logits.shape == (2, 16, 2048)


def test_a_saved_flash_attention_choice_does_not_stop_the_run(tmp_path):
    """Training runs save attn_implementation: flash_attention_2 (transformers refuses it together with
    output_attentions, so it is tested on its own); the package is not installed here."""
    model, _ = build("mixtral")
    flagged = save_with_tokenizer(model, tmp_path / "flagged")
    flags = {"attn_implementation": "flash_attention_2", "output_router_logits": True}
    _with_trained_flags(flagged, flags)
    got = _run("prune", "--model", flagged, *ARGS, "-o", tmp_path / "out")
    assert got["verified_max_abs_logit_diff"] <= 1e-4
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: exported[k] for k in flags} == flags
