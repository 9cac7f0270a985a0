"""The benchmark scripts run (CPU, small shapes) and print what their docstrings promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_cpu_mode_runs_and_reports(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["naive_over_fast_keep4"] > 1
    results = json.loads(out.read_text())
    assert len(results["per_layer"]) == 2
    assert all(len(row["keep4_kept"]) == 4 for row in results["per_layer"])
    assert set(results["skip"]) == {"prefill", "decode b1", "decode b8"}
