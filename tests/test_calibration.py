"""Calibration sources, seeded windows and manifests."""

import json

import pytest

from moe_sparsify.calibration.sources import load_documents, parse_sources
from moe_sparsify.calibration.tokens import sample_windows
from moe_sparsify.errors import UsageError
from moe_sparsify.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_windows_are_seeded_and_hashed(tokenizer):
    sources = parse_sources("bundled")
    a, manifest_a = sample_windows(tokenizer, sources, 8, 64, seed=1)
    b, manifest_b = sample_windows(tokenizer, sources, 8, 64, seed=1)
    c, manifest_c = sample_windows(tokenizer, sources, 8, 64, seed=2)
    assert a.shape == (8, 64)
    assert a.equal(b) and manifest_a == manifest_b
    assert not a.equal(c) and manifest_a["token_ids_sha256"] != manifest_c["token_ids_sha256"]


def test_file_formats_and_mixes(tmp_path, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 60
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": text}) for _ in range(3)))
    (tmp_path / "c.json").write_text(json.dumps([text, {"text": text}]))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": [text, text]}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "a.txt")) == [text]
    assert load_documents(str(tmp_path / "b.jsonl")) == [text] * 3
    assert load_documents(str(tmp_path / "c.json")) == [text] * 2
    assert load_documents(str(tmp_path / "d.parquet")) == [text] * 2
    mix = parse_sources(f"{tmp_path / 'a.txt'}=0.25,{tmp_path / 'b.jsonl'}=0.75")
    ids, manifest = sample_windows(tokenizer, mix, 8, 32, seed=0)
    assert ids.shape == (8, 32)
    assert [s["samples"] for s in manifest["sources"]] == [2, 6]


def test_not_enough_text_names_the_fix(tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(UsageError, match="lower --samples or --seq-len"):
        sample_windows(tokenizer, parse_sources(str(tmp_path / "short.txt")), 4, 64, seed=0)


@pytest.mark.parametrize("spec", ["", "a.txt=zero", "a.txt=-1"])
def test_bad_source_specs(spec):
    with pytest.raises(UsageError):
        parse_sources(spec)


def test_bad_records_are_refused(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}))
    with pytest.raises(UsageError, match="'text'"):
        load_documents(str(tmp_path / "x.jsonl"))


def test_a_visiting_layer_returns_home_with_exactly_the_changes_made_on_the_device():
    """Resident keeps a layer's host tensors while it visits another device (here "cpu:0", which forces
    real copies): unchanged tensors go back to their host copies, changed ones are copied back. A write
    the residency missed would leave the host weights stale: the check fails if changes were dropped."""
    import torch

    from moe_sparsify.adapters import adapter_for
    from moe_sparsify.calibration.propagate import Resident

    from .conftest import random_mixtral

    model = random_mixtral()
    adapter = adapter_for(model.config)
    residency = Resident(model, adapter)
    layer = adapter.decoder_layers(model)[0]
    block = adapter.moe_block(layer)
    hosts = {name: p.data for name, p in layer.named_parameters()}
    down, router = block.experts.down_proj.detach().clone(), adapter.router_weight(block).detach().clone()

    residency.load_layer(0, torch.device("cpu", 0))
    assert all(p.data_ptr() != hosts[name].data_ptr() for name, p in layer.named_parameters())
    with torch.no_grad():
        adapter.down_projection(block, 3).add_(1.0)  # in place through a view: the version counter
        adapter.router_weight(block).data = router * 2  # a new tensor
    residency.release_layer(0)

    assert torch.equal(block.experts.down_proj[3], down[3] + 1.0)
    assert torch.equal(adapter.router_weight(block), router * 2)
    unchanged = [n for n, p in layer.named_parameters() if "down_proj" not in n and "gate.weight" not in n]
    assert unchanged and all(layer.get_parameter(n).data_ptr() == hosts[n].data_ptr() for n in unchanged)
