"""Calibration presets (c4, math, code) read through `datasets`, tested on local files in the hub's own
schema and compression: nothing is downloaded."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moe_sparsify.aliases import model_aliases
from moe_sparsify.calibration import presets
from moe_sparsify.calibration.presets import PRESETS, SHUFFLE_SEED
from moe_sparsify.calibration.sources import load_documents
from moe_sparsify.cli import app

datasets = pytest.importorskip("datasets")


def _c4_shard(root, documents: int):
    """A C4 train shard as allenai/c4 stores it: gzip-compressed JSON lines of text, timestamp, url."""
    path = root / PRESETS["c4"].data_files
    path.parent.mkdir(parents=True)
    texts = [f"Document {i} talks about the weather in town number {i}. " * (3 + i % 5) for i in range(documents)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            row = {"text": text, "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z", "url": f"https://example.com/{i}"}
            f.write(json.dumps(row) + "\n")
    return path, texts


@pytest.fixture
def local_c4(tmp_path, monkeypatch):
    """The c4 preset pointed at a local directory laid out like the hub repository."""
    path, texts = _c4_shard(tmp_path / "c4", 300)
    monkeypatch.setitem(PRESETS, "c4", dataclasses.replace(PRESETS["c4"], repo=str(tmp_path / "c4"), documents=200))
    presets._documents.cache_clear()
    yield path, texts
    presets._documents.cache_clear()


def test_c4_preset_reads_the_shard_shuffled_and_capped(local_c4):
    path, texts = local_c4
    documents = load_documents("c4")
    assert len(documents) == 200 and set(documents) <= set(texts)
    assert documents != texts[:200], "shuffled, not the shard's first documents"
    shuffled = datasets.Dataset.from_dict({"text": texts}).shuffle(seed=SHUFFLE_SEED)["text"]
    assert documents == shuffled[:200], "the paper's document shuffle (seed 42), independently recomputed"
    # The same shard passed as a file is read by our own gzip reader, without `datasets`.
    assert load_documents(str(path)) == texts


def test_reading_a_preset_leaves_the_progress_bars_as_the_caller_had_them(local_c4):
    datasets.enable_progress_bars()
    load_documents("c4")
    assert not datasets.are_progress_bars_disabled()
    presets._documents.cache_clear()
    datasets.disable_progress_bars()
    try:
        load_documents("c4")
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()


def test_prune_with_the_c4_preset_records_it_in_the_manifest(local_c4, tmp_path):
    plan = tmp_path / "plan.json"
    args = ["prune", "--model", "tiny", "--keep", "6", "--calibration", "c4", "--samples", "8", "--seq-len", "64"]
    result = CliRunner().invoke(app, [*args, "--plan-only", "-o", str(plan), "--json"])
    assert result.exit_code == 0, result.stderr
    (source,) = json.loads(plan.read_text())["calibration"]["sources"]
    assert source["source"] == "c4" and source["samples"] == 8
    assert "en/c4-train.00000-of-01024.json.gz" in source["preset"] and "seed 42" in source["preset"]


def test_offline_preset_fails_in_one_line_before_the_model_is_touched(tmp_path):
    """`prune --model mixtral --keep 6` offline: the hub alias is never resolved (no weights are read or
    fetched); the one line names --calibration FILE."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-cache"),
        "HF_DATASETS_CACHE": str(tmp_path / "empty-cache" / "datasets"),
    }
    command = [sys.executable, "-m", "moe_sparsify", "prune", "--model", "mixtral", "--keep", "6"]
    done = subprocess.run(
        [*command, "--calibration", "c4", "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "--calibration FILE" in lines[0] and "'c4'" in lines[0]
    assert not (tmp_path / "empty-cache" / "hub").exists(), "the model was not looked up"


def test_hub_aliases_default_to_c4_and_the_bundled_model_keeps_its_text():
    aliases = model_aliases()
    assert aliases["tiny"].get("calibration", "bundled") == "bundled"
    hub = {name: entry for name, entry in aliases.items() if not str(entry["path"]).startswith("bundled:")}
    assert hub and all(entry.get("calibration") == "c4" for entry in hub.values())


def test_presets_are_pinned():
    assert PRESETS["c4"].repo == "allenai/c4" and PRESETS["c4"].split == "train"
    assert PRESETS["c4"].data_files == "en/c4-train.00000-of-01024.json.gz"
    assert PRESETS["math"].fields == ("problem", "solution") and len(PRESETS["math"].configs) == 7
