"""The export's README.md: hub metadata, the pruning record, and eval results recorded with --card."""

import json
import shutil
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from moe_sparsify.cli import app
from moe_sparsify.model_card import base_model_id, split_front_matter

SOURCE_CARD = """---
license: apache-2.0
language: [en, fr]
tags: [chat]
base_model: some-org/the-grandparent
---
# Source model

Benchmarks: MMLU 99.9 (unpruned).
"""


def _run(*args):
    return CliRunner().invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def export(random_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    source = shutil.copytree(random_model_dir, root / "source")
    (source / "README.md").write_text(SOURCE_CARD)
    (root / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = _run("prune", "--model", source, "--keep", "6", "--samples", "8", "--seq-len", "32", "-o", root / "out")
    assert result.exit_code == 0, result.stderr
    return root


def _eval_card(root):
    return _run("eval", "--model", root / "out", "--text", root / "eval.txt", "--window", "32", "--stride", "16",
                "--card", "--json")  # fmt: skip


def test_card_has_hub_metadata_and_the_pruning_record(export):
    out = export / "out"
    meta, body = split_front_matter((out / "README.md").read_text())
    plan = yaml.safe_load((out / "moe_sparsify_plan.yaml").read_text())
    provenance = json.loads((out / "moe_sparsify_provenance.json").read_text())
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "fr"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"moe", "expert-pruning", "moe-sparsify", "mixtral"} <= set(meta["tags"])
    assert "base_model" not in meta, "a local source has no hub id, and the source's own base_model is its parent"
    for layer in plan["layers"]:
        assert f"| {layer['layer']} | {' '.join(map(str, layer['kept']))} |" in body
    assert provenance["plan_sha256"] in body and plan["calibration"]["sha256"] in body
    assert f"**{provenance['verified_max_abs_logit_diff']:.3g}**" in body and "num_local_experts: 8 -> 6" in body
    assert "Not evaluated yet" in body
    assert str(export) not in body, "no local directories of the author in a public card"
    # The source card is kept below, folded and labelled, not copied over the export's card.
    assert body.index("## Pruning record") < body.index("## The source model's card") < body.index("MMLU 99.9")


def test_eval_card_appends_results_and_keeps_the_rest(export):
    card = export / "out" / "README.md"
    before = card.read_text()
    first = _eval_card(export)
    assert first.exit_code == 0, first.stderr
    second = _eval_card(export)
    assert second.exit_code == 0, second.stderr
    runs = json.loads((export / "out" / "moe_sparsify_evals.json").read_text())
    assert [r["perplexity"] for r in runs] == [json.loads(r.stdout)["perplexity"] for r in (first, second)]
    after = card.read_text()
    assert "Not evaluated yet" not in after
    assert after.count(f"| {runs[0]['perplexity']:.4f} |") == 2 and "| eval.txt | 32 / 16 |" in after
    assert str(export) not in after
    head = before.split("<!-- moe-sparsify:evaluation -->")[0]
    tail = before.split("<!-- /moe-sparsify:evaluation -->")[1]
    assert after.startswith(head) and after.endswith(tail)


def test_eval_card_refuses_a_model_that_is_not_an_export(export):
    result = _run("eval", "--model", export / "source", "--card")
    assert result.exit_code == 2
    assert "export the model first" in result.stderr.strip().splitlines()[-1]
    assert not (export / "source" / "moe_sparsify_evals.json").exists()


def test_base_model_is_the_hub_id_of_the_source():
    assert base_model_id(SimpleNamespace(source="mixtral"), {}) == "mistralai/Mixtral-8x7B-v0.1"
    assert base_model_id(SimpleNamespace(source="Qwen/Qwen3-30B-A3B"), {}) == "Qwen/Qwen3-30B-A3B"
    assert base_model_id(SimpleNamespace(source="/data/ckpt"), {"_name_or_path": "org/name"}) == "org/name"
    assert base_model_id(SimpleNamespace(source="/data/ckpt"), {"_name_or_path": "/data/ckpt"}) is None
