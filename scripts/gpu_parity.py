"""Does the CLI choose the same experts on CUDA as on the CPU? One run, one table.

    python scripts/gpu_parity.py --reference-only --out-dir ref   # on the CPU machine: reference plans
    python scripts/gpu_parity.py --reference ref --out-dir gpu    # on the GPU machine: compare with them

Each case runs `moe-sparsify prune --plan-only --json` on the bundled model, as a
user would, in a fresh process. The CPU float32 plans are the reference; the
CUDA runs (float32, and bfloat16 as CUDA's default dtype) are compared with
them layer by layer: the kept experts, and the relative difference of the
chosen subset's loss. Then the whole pipeline runs on CUDA once (prune with
its verification reload, eval, skip-profile) and each exit code is recorded.

A layer whose kept set differs is reported with the runner-up margin of the
reference, so a near-tie (a margin below the dtype's rounding) can be told
from a real disagreement. Exit status 1 if any float32 layer disagrees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (name, extra prune arguments)
    ("keep6", ["--keep", "6"]),
    ("keep4", ["--keep", "4"]),
    ("keep4-e2e", ["--keep", "4", "--strategy", "e2e"]),
]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_sparsify.cli", *args], cwd=ROOT, capture_output=True, text=True)


def plan(case_args: list[str], device: str, dtype: str, path: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    done = cli("prune", *case_args, "--plan-only", "-o", str(path), "--json", "--device", device, "--dtype", dtype)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"prune {' '.join(case_args)} on {device}/{dtype} failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout), seconds


def compare(reference: dict, other: dict) -> dict:
    rows = []
    for ref, got in zip(reference["layers"], other["layers"], strict=True):
        margin = (ref["runner_up_loss"] - ref["loss"]) / ref["loss"] if ref.get("runner_up_loss") else None
        rows.append(
            {
                "layer": ref["layer"],
                "same_kept": ref["kept"] == got["kept"],
                "loss_rel_diff": abs(got["loss"] - ref["loss"]) / ref["loss"],
                "reference_margin": margin,
            }
        )
    return {
        "layers_agree": sum(r["same_kept"] for r in rows),
        "layers": len(rows),
        "max_loss_rel_diff": max(r["loss_rel_diff"] for r in rows),
        "disagreements": [r for r in rows if not r["same_kept"]],
    }


def pipeline_on_cuda(workdir: Path) -> dict:
    """prune (with the export's verification reload), eval and skip-profile, all on CUDA."""
    out = workdir / "pruned"
    steps = {
        "prune_export_verify": ["prune", "--keep", "6", "-o", str(out), "--json", "--device", "cuda"],
        "eval_perplexity": ["eval", "--model", str(out), "--json", "--device", "cuda"],
        "skip_profile": [
            "skip-profile",
            "--model",
            str(out),
            "-o",
            str(workdir / "thresholds.json"),
            "--json",
            "--device",
            "cuda",
        ],
    }
    results = {}
    for name, args in steps.items():
        start = time.perf_counter()
        done = cli(*args)
        results[name] = {"exit": done.returncode, "seconds": time.perf_counter() - start}
        if done.returncode:
            results[name]["stderr"] = done.stderr.strip()[-600:]
        elif name == "eval_perplexity":
            results[name]["result"] = json.loads(done.stdout)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, help="folder of CPU plans written by --reference-only")
    ap.add_argument("--reference-only", action="store_true", help="write the CPU float32 plans and stop")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.reference_only:
        for name, case_args in CASES:
            result, seconds = plan(case_args, "cpu", "float32", args.out_dir / f"{name}.plan.json")
            result["seconds"] = seconds
            (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{name}: cpu float32 in {seconds:.1f} s")
        return 0

    import torch

    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case_args in CASES:
            reference = json.loads((args.reference / f"{name}.json").read_text())
            entry = {"cpu_float32_s": reference["seconds"]}
            for dtype in ("float32", "bfloat16"):
                result, seconds = plan(case_args, "cuda", dtype, Path(tmp) / f"{name}-{dtype}.json")
                entry[dtype] = {"seconds": seconds, **compare(reference, result)}
            report["cases"][name] = entry
        report["pipeline"] = pipeline_on_cuda(Path(tmp))
    (args.out_dir / "gpu_parity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['gpu']}, torch {report['torch']}")
    print(f"{'case':<12} {'dtype':<9} {'layers agree':>13} {'max loss diff':>14} {'cuda s':>7} {'cpu s':>6}")
    for name, entry in report["cases"].items():
        for dtype in ("float32", "bfloat16"):
            row = entry[dtype]
            print(
                f"{name:<12} {dtype:<9} {row['layers_agree']:>6}/{row['layers']:<6} "
                f"{row['max_loss_rel_diff']:>14.2e} {row['seconds']:>7.1f} {entry['cpu_float32_s']:>6.1f}"
            )
            for bad in row["disagreements"]:
                print(f"    layer {bad['layer']}: kept differs; reference runner-up margin {bad['reference_margin']}")
    for name, step in report["pipeline"].items():
        print(f"{name:<20} exit {step['exit']} in {step['seconds']:.1f} s {step.get('stderr', '')}")
    float32_ok = all(e["float32"]["layers_agree"] == e["float32"]["layers"] for e in report["cases"].values())
    pipeline_ok = all(step["exit"] == 0 for step in report["pipeline"].values())
    return 0 if float32_ok and pipeline_ok else 1


if __name__ == "__main__":
    sys.exit(main())
