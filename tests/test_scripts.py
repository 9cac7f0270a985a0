"""The benchmark scripts run (CPU, small shapes) and print what their docstrings promise."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_cpu_mode_runs_and_reports(tmp_path, monkeypatch, capsys):
    """Timings are reported, never compared here (a loaded machine would flip any ratio); what the run
    decided is checked instead. Run as `__main__` in this process: a fresh interpreter would spend more
    CPU importing torch and transformers than the benchmark's tiny shapes take."""
    out = tmp_path / "results.json"
    argv = ["scripts/bench_gpu.py", "--device", "cpu", "--tiny", "--layers", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first on it
    runpy.run_path(str(ROOT / "scripts" / "bench_gpu.py"), run_name="__main__")
    done = capsys.readouterr()
    summary = json.loads(done.out.strip().splitlines()[-1])
    assert all(math.isfinite(value) and value > 0 for value in summary.values())
    results = json.loads(out.read_text())
    (layer,) = results["per_layer"]
    for keep in (6, 4):
        kept = layer[f"keep{keep}_kept"]
        assert len(set(kept)) == keep and set(kept) <= set(range(8))
    assert set(results["skip"]) == {"prefill", "decode b1", "decode b8"}
    # Median thresholds on top-2 routing: half the tokens drop their second expert, a quarter of the pairs.
    assert results["skip"]["prefill"]["pairs_skipped"] == pytest.approx(0.25, abs=0.05)


def test_merge_alignment_reports_aligned_pairs_at_least_as_correlated_as_plain_ones(monkeypatch, capsys):
    """The Hungarian assignment maximises the summed correlation over every order, the plain one included,
    so aligned pairs correlate at least as well; loss ratios are positive and finite."""
    argv = ["scripts/merge_alignment.py", "--samples", "4", "--seq-len", "32", "--keep", "4", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(ROOT / "scripts" / "merge_alignment.py"), run_name="__main__")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["keep4"]
    assert summary["aligned_corr"] >= summary["plain_corr"]
    assert all(math.isfinite(summary[k]) and summary[k] > 0 for k in ("plain_loss", "aligned_loss"))


def test_e2e_cost_on_paper_reproduces_the_hand_computed_mixtral_costs(monkeypatch, capsys):
    """The closed forms at Mixtral-8x7B's shapes give what was computed by hand from the README's formula
    before the script existed: exhaustive 18.6 / 24.5 PFLOP, e2e 938 / 944, the earlier e2e-fast 41.9 / 47.9."""
    monkeypatch.setattr(sys, "argv", ["scripts/e2e_cost_on_paper.py"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first on it
    runpy.run_path(str(ROOT / "scripts" / "e2e_cost_on_paper.py"), run_name="__main__")
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "| 18.6 PFLOP | 938.1 PFLOP (50.50x) | 41.9 PFLOP (2.26x) |" in rows["6"]
    assert "| 24.5 PFLOP | 944.0 PFLOP (38.55x) | 47.9 PFLOP (1.95x) |" in rows["4"]
