"""Layer streaming: layers read from disk one at a time equal the loaded model, and --stream plans match."""

import json

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.errors import UsageError
from moe_sparsify.models import load_model
from moe_sparsify.streaming import StreamedModel, streamed_logits

from .conftest import save_with_tokenizer
from .test_cli import FAST, run
from .test_families import FAMILIES, build


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_layers_equal_the_loaded_model(family, tmp_path):
    model, adapter = build(family)
    source = save_with_tokenizer(model, tmp_path / "m")
    if not adapter.streamable or adapter.config_section:
        with pytest.raises(UsageError, match="run without --stream"):
            StreamedModel(source, adapter, torch.float32)
        return
    loaded, _ = load_model(source, torch.float32)
    streamed = StreamedModel(source, adapter, torch.float32)
    for index, reference in enumerate(adapter.decoder_layers(loaded)):
        layer = streamed.load_layer(index, torch.device("cpu"))
        got = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
        for name, tensor in {**dict(reference.named_parameters()), **dict(reference.named_buffers())}.items():
            assert torch.equal(got[name], tensor), f"layer {index} {name}"
        streamed.release_layer(index)
        assert all(p.device.type == "meta" for p in layer.parameters())
    weights = streamed.router_weights()
    for index in adapter.moe_layers(loaded):
        assert torch.equal(
            weights[index], adapter.router_weight(adapter.moe_block(adapter.decoder_layers(loaded)[index]))
        )
    # Longer than every sliding window in FAMILIES (GPT-OSS: 16), so per-layer masks matter.
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (streamed_logits(source, adapter, ids) - loaded(input_ids=ids).logits).abs().max() <= 1e-5


def test_prune_stream_gives_the_in_memory_plan_and_a_verified_checkpoint(tmp_path):
    memory = run("prune", "--model", "tiny", "--keep", 6, "--plan-only", "-o", tmp_path / "a.yaml", *FAST)
    assert memory.exit_code == 0
    result = run("prune", "--model", "tiny", "--keep", 6, "--stream", "-o", tmp_path / "out", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified_max_abs_logit_diff"] <= 1e-4
    assert (tmp_path / "out" / "moe_sparsify_plan.yaml").read_bytes() == (tmp_path / "a.yaml").read_bytes()
    assert adapter_for(load_model(tmp_path / "out", torch.float32)[0].config).num_experts == 6


def test_calibrate_stream_stores_the_same_inputs(tmp_path):
    from safetensors.torch import load_file

    for name, extra in (("memory", []), ("stream", ["--stream"])):
        assert run("calibrate", "--model", "tiny", "-o", tmp_path / name, *FAST, *extra).exit_code == 0
    for layer in range(4):
        a, b = (
            load_file(tmp_path / name / f"layer_{layer:03d}.safetensors")["moe_input"] for name in ("memory", "stream")
        )
        assert torch.equal(a, b)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("memory", "stream")]
    assert manifests[0] == manifests[1]
