"""MXFP4 and compressed-tensors decoding: ours, the plain reference and the libraries' own agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM
from typer.testing import CliRunner

from moe_sparsify import quant
from moe_sparsify.adapters import adapter_for
from moe_sparsify.cli import app
from moe_sparsify.errors import UsageError
from moe_sparsify.models import load_config, load_model
from moe_sparsify.quant.compressed import CompressedTensors, _unpack_int32
from moe_sparsify.quant.mxfp4 import Mxfp4, _e2m1_values

from .conftest import random_mixtral, save_with_tokenizer
from .quant_checkpoints import ct_scheme, write_compressed, write_mxfp4
from .test_quant import DEEPSEEK_V3, _prune, _prune_both_and_compare, _raw_bytes, _tensors

CT_PRESETS = ["W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "NVFP4A16"]


def random_gpt_oss(layers: int = 2, seed: int = 0):
    """hidden 64 (two MX blocks), expert width 96: three MX blocks, not a multiple of 128."""
    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return GptOssForCausalLM(config).eval()


def random_deepseek_v3():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3)).eval()


def _groups(fmt, directory):
    state = load_file(directory / "model.safetensors")
    return {logical: {role: state[raw] for role, raw in g.items()} for logical, g in fmt.group(state).items()}


def test_e2m1_table_is_transformers_table():
    from transformers.integrations.mxfp4 import FP4_VALUES

    assert _e2m1_values().tolist() == FP4_VALUES


def test_mxfp4_decode_equals_transformers_and_the_float_copy(tmp_path):
    save_with_tokenizer(random_gpt_oss(), tmp_path / "float")
    write_mxfp4(tmp_path / "float", tmp_path / "q", tmp_path / "copy")
    fmt = Mxfp4(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"])
    copy = load_file(tmp_path / "copy" / "model.safetensors")
    groups = _groups(fmt, tmp_path / "q")
    assert sorted(groups) == sorted(n for n in copy if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    for logical, parts in groups.items():
        assert torch.equal(fmt.dequantize(logical, parts), copy[logical])
        assert torch.equal(fmt.reference_dequantize(logical, parts), copy[logical])
    # A decoder reading the nibbles the wrong way round disagrees: the comparison can fail.
    logical, parts = next(iter(groups.items()))
    swapped = {**parts, "blocks": (parts["blocks"] >> 4) | (parts["blocks"] << 4)}
    assert not torch.equal(fmt.dequantize(logical, swapped), copy[logical])


@pytest.mark.parametrize("preset", [*CT_PRESETS, "W3A16"])  # 3-bit fields straddle int32 words
def test_compressed_tensors_decode_equals_the_library(tmp_path, preset):
    save_with_tokenizer(random_mixtral(hidden=64), tmp_path / "float")
    written = write_compressed(tmp_path / "float", tmp_path / "q", tmp_path / "copy", ct_scheme(preset))
    fmt = CompressedTensors(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"])
    copy = load_file(tmp_path / "copy" / "model.safetensors")
    groups = _groups(fmt, tmp_path / "q")
    # Every linear of the decoder layers but the routers: 4 attention + 8 x 3 expert projections a layer.
    assert len(groups) == 2 * (4 + 8 * 3)
    assert not any(".gate.weight" in name for name in groups)
    for logical, parts in groups.items():
        assert fmt.scheme_for(logical)[1] == written
        assert torch.equal(fmt.dequantize(logical, parts), copy[logical].float())
        assert torch.allclose(fmt.reference_dequantize(logical, parts), copy[logical].float(), rtol=1e-6, atol=1e-7)


# --- end to end: search on the decoded weights, byte-identical export, verification ---------------


# Kimi-K2-Thinking's recipe: INT4 W4A16 routed experts (group 32 there, 8 for these widths), attention, shared
# experts, dense MLPs and router left float; on DeepSeek-V3's architecture with MLA, as Kimi-K2 is.
KIMI_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    "re:.*mlp\\.gate$",
]


def _build(kind: str, root: Path) -> None:
    if kind == "mxfp4":
        save_with_tokenizer(random_gpt_oss(), root / "float")
        write_mxfp4(root / "float", root / "q", root / "copy")
    elif kind == "kimi_k2":
        save_with_tokenizer(random_deepseek_v3(), root / "float")
        write_compressed(root / "float", root / "q", root / "copy", ct_scheme("W4A16", group_size=8), KIMI_IGNORE)
    else:
        save_with_tokenizer(random_mixtral(hidden=64), root / "float")
        write_compressed(root / "float", root / "q", root / "copy", ct_scheme(kind))


@pytest.fixture(scope="module", params=["mxfp4", *CT_PRESETS, "kimi_k2"])
def quant_pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """(quantized checkpoint, float copy of what it encodes, decoded by the format's library)."""
    root = tmp_path_factory.mktemp(request.param)
    _build(request.param, root)
    return root / "q", root / "copy"


def _expected_export(source: dict, adapter, fmt, kept) -> tuple[dict[str, bytes], int]:
    """Each export tensor's bytes as the source's (renumbered, or the kept rows of the expert axis), and
    the bytes of removed experts."""
    expected, removed = {}, 0
    for name, tensor in source.items():
        rule = adapter.tensor_rule(name) or adapter.tensor_rule(fmt.export_alias(name))
        if rule is None or rule.layer not in kept:
            expected[name] = _raw_bytes(tensor)
        elif rule.kind == "expert":
            if rule.expert in kept[rule.layer]:
                expected[rule.renamed(kept[rule.layer].index(rule.expert))] = _raw_bytes(tensor)
            else:
                removed += tensor.numel() * tensor.element_size()
        else:  # fused experts (codes and scales alike), router rows and biases: dim 0 is the expert axis
            expected[name] = _raw_bytes(tensor[kept[rule.layer]])
            removed += tensor[0].numel() * tensor.element_size() * (tensor.shape[0] - len(kept[rule.layer]))
    return expected, removed


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_plan_equals_the_float_copy_and_the_export_keeps_the_bytes(quant_pair, tmp_path, stream):
    q, copy = quant_pair
    flags = ["--stream"] if stream else []
    got = _prune_both_and_compare(q, copy, tmp_path, *flags)

    source, export = _tensors(q), _tensors(tmp_path / "out")
    fmt = quant.detect(q)
    assert any(".experts." in logical for logical in fmt.group(source))  # the experts are stored quantized
    kept = {lp["layer"]: lp["kept"] for lp in got["layers"]}
    expected, removed = _expected_export(source, adapter_for(load_config(q)), fmt, kept)
    assert {name: _raw_bytes(t) for name, t in export.items()} == expected
    size = sum(t.numel() * t.element_size() for t in export.values())
    assert size == sum(t.numel() * t.element_size() for t in source.values()) - removed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((q / "config.json").read_text())["quantization_config"]


def test_export_reloads_through_transformers_quantizer(quant_pair, tmp_path):
    """transformers' own load of the export (its quantizer dequantizing on the CPU) matches the masked float
    copy, where transformers decodes the format exactly; where not (zero points, NVFP4's global scale),
    verification decoded the export with the reference decode, and the provenance says so."""
    q, copy = quant_pair
    got = _prune(q, tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "moe_sparsify_provenance.json").read_text())
    fmt = quant.detect(q)
    if not isinstance(fmt, Mxfp4) and (q.parent.name.startswith(("W4A16_ASYM", "NVFP4"))):
        assert "reference decode" in provenance["verified_by"]
        return
    assert f"transformers' own {fmt.label}" in provenance["verified_by"]
    kept = {lp["layer"]: lp["kept"] for lp in got["layers"]}
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, **fmt.transformers_load_kwargs()
    )
    float_model, _ = load_model(copy, torch.float32)
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), adapter_for(load_config(copy)).pruned_view(float_model, kept):
        expected = float_model(input_ids=ids).logits
    with torch.no_grad():
        assert (reloaded.eval()(input_ids=ids).logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("kind", ["mxfp4", "W4A16"])
def test_a_decode_that_ignores_the_scales_fails_verification(kind, tmp_path, monkeypatch, stream):
    """The search's decode is deliberately wrong (the codes read as numbers, scales ignored): the export is
    decoded apart from it, so verification fails and no output is left."""
    _build(kind, tmp_path)
    if kind == "mxfp4":

        def codes_only(self, logical, parts):
            nibbles = torch.stack([parts["blocks"] & 0x0F, parts["blocks"] >> 4], dim=-1)
            return nibbles.flatten(-3).float().transpose(-1, -2)

        monkeypatch.setattr(Mxfp4, "dequantize", codes_only)
    else:

        def codes_only(self, logical, parts):
            return _unpack_int32(parts["weight_packed"], 4, int(parts["weight_shape"][1])).float()

        monkeypatch.setattr(CompressedTensors, "dequantize", codes_only)
    args = ["prune", "--model", str(tmp_path / "q"), "--keep", "6", "--samples", "4", "--seq-len", "32"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o"), *(["--stream"] if stream else [])])
    assert result.exit_code == 1
    assert "disagrees with the pruned source" in result.stderr
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial*"))
    assert not (tmp_path / "o.progress.json").exists()  # no journal of decisions made on the wrong decode


def test_missing_compressed_tensors_is_one_line_naming_pip(tmp_path, monkeypatch):
    import importlib.util

    _build("W4A16", tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else real(name, *a)
    )
    result = CliRunner().invoke(
        app, ["prune", "--model", str(tmp_path / "q"), "--keep", "6", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and 'pip install "compressed-tensors' in result.stderr
    assert not (tmp_path / "o").exists()


def test_module_lists_naming_experts_are_renumbered_on_export():
    fmt = CompressedTensors(
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 16}}},
            "ignore": [
                "lm_head",
                "model.layers.0.block_sparse_moe.experts.5.w2",
                "model.layers.0.block_sparse_moe.experts.1.w1",
            ],
        }
    )
    qconfig = dict(fmt.config)
    fmt.pruned_config(qconfig, {0: [0, 2, 3, 4, 5, 6]})
    assert qconfig["ignore"] == ["lm_head", "model.layers.0.block_sparse_moe.experts.4.w2"]


def test_fused_compressed_tensors_experts_are_refused_by_name():
    fmt = CompressedTensors(
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"g": {"targets": ["Linear"]}},
        }
    )
    names = [
        "model.layers.0.mlp.experts.gate_up_proj.weight_packed",
        "model.layers.0.mlp.experts.gate_up_proj.weight_scale",
    ]
    with pytest.raises(UsageError, match="experts.gate_up_proj holds compressed-tensors experts fused"):
        fmt.group(names)


@pytest.mark.parametrize("kind", ["mxfp4", "NVFP4A16"])
def test_eval_and_skip_profile_run_on_the_decoded_model(kind, tmp_path):
    _build(kind, tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)

    def perplexity(model: Path) -> float:
        args = ["eval", "--model", str(model), "--text", str(text), "--window", "64", "--stride", "32", "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["perplexity"]

    assert perplexity(tmp_path / "q") == pytest.approx(perplexity(tmp_path / "copy"), rel=1e-5)
    args = [
        "skip-profile",
        "--model",
        str(tmp_path / "q"),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "-o",
        str(tmp_path / "t"),
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
