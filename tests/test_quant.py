"""Quantized checkpoints: format detection and refusals, FP8 block decoding, in-memory and streamed search
on the decoded weights, byte-identical export, and a verification that catches a wrong decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from moe_sparsify import quant
from moe_sparsify.cli import app
from moe_sparsify.errors import FailedRun, UsageError
from moe_sparsify.quant.fp8 import FP8Block

from .conftest import random_mixtral, save_with_tokenizer
from .fp8_checkpoints import dequantize, quantize, write_fp8


def _config_dir(tmp_path: Path, config: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


# --- detection --------------------------------------------------------------------------------------


def test_float_checkpoint_has_no_format(tmp_path):
    assert quant.detect(_config_dir(tmp_path, {"model_type": "mixtral"})) is None


def test_fp8_is_detected_top_level_and_in_text_config(tmp_path):
    qconfig = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    top = quant.detect(_config_dir(tmp_path / "a", {"quantization_config": qconfig}))
    nested = quant.detect(_config_dir(tmp_path / "b", {"text_config": {"quantization_config": qconfig}}))
    assert isinstance(top, FP8Block) and isinstance(nested, FP8Block) and top.block == (128, 128)


@pytest.mark.parametrize(
    ("qconfig", "named"),
    [
        ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
        ({"quant_method": "awq"}, "AWQ"),
        ({"load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "hqq"}, "HQQ"),
        ({"quant_method": "someday"}, "someday"),
    ],
)
def test_formats_not_handled_are_refused_by_name(tmp_path, qconfig, named):
    with pytest.raises(UsageError, match=f"is a {named}.*pass the float checkpoint"):
        quant.detect(_config_dir(tmp_path, {"quantization_config": qconfig}))


def test_gguf_directory_is_refused(tmp_path):
    _config_dir(tmp_path, {"model_type": "mixtral"})
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="GGUF"):
        quant.detect(tmp_path)


def test_cli_refuses_an_unhandled_format_in_one_line(tmp_path, random_model_dir):
    source = tmp_path / "gptq"
    source.mkdir()
    for path in random_model_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    result = CliRunner().invoke(app, ["prune", "--model", str(source), "--keep", "6", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "GPTQ" in result.stderr
    assert not (tmp_path / "out").exists()


# --- FP8 block decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 24), (3, 40, 24), (16, 32), (7, 5)])
def test_fp8_decodes_partial_edge_blocks_as_the_block_loop_does(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    codes, scale = quantize(weight, (16, 16))
    fmt = FP8Block({"quant_method": "fp8", "weight_block_size": [16, 16]})
    parts = {"weight": codes, "weight_scale_inv": scale}
    expected = dequantize(codes, scale, (16, 16))
    assert torch.equal(fmt.dequantize("w", parts), expected)
    assert torch.equal(fmt.reference_dequantize("w", parts), expected)
    assert (expected - weight).abs().max() <= 0.07 * weight.abs().max()  # and it is the weight, FP8-rounded


def test_fp8_scales_that_do_not_fit_the_block_size_fail_instead_of_guessing():
    codes, scale = quantize(torch.randn(40, 24), (16, 16))  # a 3 x 2 grid
    fmt = FP8Block({"quant_method": "fp8", "weight_block_size": [8, 8]})  # would need 5 x 3
    with pytest.raises(FailedRun, match=r"needs \(5, 3\)"):
        fmt.dequantize("w", {"weight": codes, "weight_scale_inv": scale})


def test_fp8_ue8m0_scales_are_powers_of_two():
    fmt = FP8Block({"quant_method": "fp8", "weight_block_size": [2, 2], "scale_fmt": "ue8m0"})
    codes = torch.ones(2, 2).to(torch.float8_e4m3fn)
    out = fmt.dequantize("w", {"weight": codes, "weight_scale_inv": torch.tensor([[129]], dtype=torch.uint8)})
    assert torch.equal(out, torch.full((2, 2), 4.0))


def test_fp8_groups_codes_with_scales_and_leaves_float_weights_alone():
    fmt = FP8Block({"quant_method": "fp8", "weight_block_size": [128, 128]})
    names = [
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.gate_up_proj_scale_inv",
    ]
    groups = fmt.group(names)
    assert set(groups) == {
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
    }
    assert (
        fmt.export_alias("model.layers.0.mlp.experts.gate_up_proj_scale_inv")
        == "model.layers.0.mlp.experts.gate_up_proj"
    )


def test_module_lists_lose_removed_experts_and_renumber_kept_ones():
    fmt = FP8Block({"quant_method": "fp8", "weight_block_size": [128, 128]})
    qconfig = {
        "modules_to_not_convert": [
            "lm_head",
            "model.layers.1.mlp.experts.2.down_proj",
            "model.layers.1.mlp.experts.5",
            "model.layers.0.mlp.experts.5.up_proj",
        ],
        "weight_block_size": [128, 128],
    }
    changes = fmt.pruned_config(qconfig, {1: [0, 1, 3, 5], 0: [0, 1, 2, 3, 4, 5]})
    assert qconfig["modules_to_not_convert"] == [
        "lm_head",
        "model.layers.1.mlp.experts.3",
        "model.layers.0.mlp.experts.5.up_proj",
    ]
    assert changes == ["quantization_config.modules_to_not_convert: 4 -> 3 entries, experts renumbered"]


# --- end to end: search, export, verification -----------------------------------------------------

# DeepSeek-V3 scaled down in the published layout: MLA whose kv_a_proj_with_mqa has 40 rows (kv_lora_rank 32 +
# rope 8: 2.5 blocks of 16, as DeepSeek-V3's 576 rows are 4.5 blocks of 128), experts 24 wide (1.5 blocks).
DEEPSEEK_V3 = dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    vocab_size=2048,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=16,
    kv_lora_rank=32,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=128,
    initializer_range=0.2,
)
BLOCK = (16, 16)


def _random_deepseek_v3():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3)).eval()
    for layer in model.model.layers[1:]:  # a selection bias that matters
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(1)) * 0.2)
    return model


CHECKPOINTS = {  # name: (model, fused experts on disk)
    "mixtral": (lambda: random_mixtral(hidden=64), False),  # every dimension a whole number of 16-blocks
    "deepseek_v3": (_random_deepseek_v3, False),  # partial edge blocks, the hub's per-expert tensors
    "deepseek_v3-fused": (_random_deepseek_v3, True),  # experts.gate_up_proj + experts.gate_up_proj_scale_inv
}


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """name -> (FP8 checkpoint, float copy of what it encodes), each built once."""
    built: dict[str, tuple[Path, Path]] = {}

    def pair(name: str) -> tuple[Path, Path]:
        if name not in built:
            build, fused = CHECKPOINTS[name]
            root = tmp_path_factory.mktemp(name)
            save_with_tokenizer(build(), root / "float")
            write_fp8(root / "float", root / "fp8", root / "copy", BLOCK, fused=fused)
            built[name] = root / "fp8", root / "copy"
        return built[name]

    return pair


def _prune(source: Path, output: Path, *flags: str) -> dict:
    args = ["prune", "--model", str(source), "--keep", "6", "--samples", "8", "--seq-len", "32", "-o", str(output)]
    result = CliRunner().invoke(app, [*args, "--json", *flags])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _prune_both_and_compare(quantized: Path, copy: Path, tmp_path: Path, *flags: str) -> dict:
    """Prune the quantized checkpoint (exported to tmp_path/out) and its float copy (plan only); both must
    keep the same experts with the same losses. Returns the quantized run's result."""
    got = _prune(quantized, tmp_path / "out", *flags)
    want = _prune(copy, tmp_path / "copy.plan.yaml", "--plan-only", *flags)
    assert [lp["kept"] for lp in got["layers"]] == [lp["kept"] for lp in want["layers"]]
    for a, b in zip(got["layers"], want["layers"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert got["verified_max_abs_logit_diff"] <= 1e-4
    return got


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_fp8_plan_equals_its_float_copy_and_the_export_keeps_the_bytes(fp8_pair, tmp_path, name, stream):
    from moe_sparsify.adapters import adapter_for
    from moe_sparsify.models import load_config, load_decoded, load_model

    fp8, copy = fp8_pair(name)
    flags = ["--stream"] if stream else []
    got = _prune_both_and_compare(fp8, copy, tmp_path, *flags)
    verified_by = json.loads((tmp_path / "out" / "moe_sparsify_provenance.json").read_text())["verified_by"]
    whole_blocks_in_memory = name == "mixtral" and not stream
    assert ("transformers' own FP8" in verified_by) == whole_blocks_in_memory
    assert ("reference decode" in verified_by) != whole_blocks_in_memory

    # Bytes: every export tensor is the source tensor under its renumbered name (router rows: the kept rows).
    source, export = _tensors(fp8), _tensors(tmp_path / "out")
    adapter, fmt = adapter_for(load_config(fp8)), quant.detect(fp8)
    kept = {lp["layer"]: lp["kept"] for lp in got["layers"]}
    removed_bytes, expected_names = 0, set()
    for name, tensor in source.items():
        rule = adapter.tensor_rule(name) or adapter.tensor_rule(fmt.export_alias(name))
        if rule is not None and rule.kind == "expert":
            if rule.expert in kept[rule.layer]:
                new = rule.renamed(kept[rule.layer].index(rule.expert))
                assert _raw_bytes(export[new]) == _raw_bytes(tensor), name
                expected_names.add(new)
            else:
                removed_bytes += tensor.numel() * tensor.element_size()
        elif rule is not None:  # fused experts with their scales, router rows, correction biases
            assert _raw_bytes(export[name]) == _raw_bytes(tensor[kept[rule.layer]]), name
            removed_bytes += (tensor.numel() - export[name].numel()) * tensor.element_size()
            expected_names.add(name)
        else:
            assert _raw_bytes(export[name]) == _raw_bytes(tensor), name
            expected_names.add(name)
    assert set(export) == expected_names
    size = sum(t.numel() * t.element_size() for t in export.values())
    assert size == sum(t.numel() * t.element_size() for t in source.values()) - removed_bytes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]

    # The export decodes to the float copy with the removed experts masked.
    float_model, _ = load_model(copy, torch.float32)
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), adapter.pruned_view(float_model, kept):
        expected = float_model(input_ids=ids).logits
    exported = load_decoded(tmp_path / "out", torch.float32, reference_decode=True)
    with torch.no_grad():
        assert (exported(input_ids=ids).logits - expected).abs().max() <= 1e-4


def test_fp8_export_reloads_through_transformers_quantizer(fp8_pair, tmp_path):
    """Where every dimension is whole blocks, transformers' own FP8 load of the export (which verification
    used) matches the masked float copy. With partial edge blocks it infers a wrong block, so verification
    decodes those exports with the reference decode, and the provenance says so."""
    from transformers import AutoModelForCausalLM

    from moe_sparsify.adapters import adapter_for
    from moe_sparsify.models import load_config, load_model

    fp8, copy = fp8_pair("mixtral")
    got = _prune(fp8, tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "moe_sparsify_provenance.json").read_text())
    assert "transformers' own FP8" in provenance["verified_by"]
    kept = {lp["layer"]: lp["kept"] for lp in got["layers"]}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    float_model, _ = load_model(copy, torch.float32)
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), adapter_for(load_config(copy)).pruned_view(float_model, kept):
        expected = float_model(input_ids=ids).logits
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max() <= 1e-4


# Each verification path once: transformers' decode (mixtral in memory), the reference decode in memory
# (partial blocks) and streamed.
@pytest.mark.parametrize(("name", "stream"), [("mixtral", False), ("deepseek_v3", False), ("deepseek_v3-fused", True)])
def test_a_decode_that_ignores_the_scales_fails_verification(fp8_pair, tmp_path, monkeypatch, name, stream):
    """The search's decode is deliberately wrong (raw codes as numbers, as --stream once did): the export is
    decoded apart from it, so verification fails and no output is left."""
    monkeypatch.setattr(FP8Block, "dequantize", lambda self, logical, parts: parts["weight"].to(torch.float32))
    fp8, _ = fp8_pair(name)
    args = ["prune", "--model", str(fp8), "--keep", "6", "--samples", "4", "--seq-len", "32", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args + (["--stream"] if stream else []))
    assert result.exit_code == 1
    assert "disagrees with the pruned source" in result.stderr
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial*"))


@pytest.fixture(scope="module")
def mixtral_fp8(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixtral-fp8")
    save_with_tokenizer(random_mixtral(hidden=64), root / "float")
    write_fp8(root / "float", root / "fp8", root / "copy", BLOCK)
    return root / "fp8", root / "copy"


def test_missing_accelerate_is_one_line_naming_the_pip_command(mixtral_fp8, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a)
    )
    result = CliRunner().invoke(
        app, ["prune", "--model", str(mixtral_fp8[0]), "--keep", "6", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and 'pip install "accelerate' in result.stderr
    assert not (tmp_path / "o").exists()


def test_eval_and_skip_profile_run_on_the_decoded_fp8_model(mixtral_fp8, tmp_path):
    fp8, copy = mixtral_fp8
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)

    def perplexity(model: Path) -> float:
        result = CliRunner().invoke(
            app, ["eval", "--model", str(model), "--text", str(text), "--window", "64", "--stride", "32", "--json"]
        )
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["perplexity"]

    assert perplexity(fp8) == pytest.approx(perplexity(copy), rel=1e-5)
    args = ["skip-profile", "--model", str(fp8), "--samples", "4", "--seq-len", "32", "-o", str(tmp_path / "t.json")]
    assert CliRunner().invoke(app, args).exit_code == 0
