"""Held-out perplexity and KL to the original of every pruning strategy on the bundled model.

    python scripts/quality_table.py                      # keep 6 and 4, ~3 min on 2 CPU cores
    python scripts/quality_table.py --keep 6 --out docs/quality

Calibrates once (the bundled calib split), plans with every strategy, applies
each plan in memory and scores the bundled held-out split (which neither
training nor calibration saw): perplexity (sliding window 256, stride 128)
and the mean per-token KL(original || pruned) of next-token distributions on
non-overlapping 256-token windows. Random runs 5 seeds: mean and best. Search
time is the planning time of each strategy on the same tokens. Writes
OUT/quality.json and, with matplotlib installed (pip install -e ".[report]"),
OUT/quality.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.calibration.sources import load_documents, parse_sources  # noqa: E402
from moe_sparsify.calibration.tokens import sample_windows, token_stream  # noqa: E402
from moe_sparsify.config import Settings  # noqa: E402
from moe_sparsify.evaluate import mean_kl, next_token_log_probs, perplexity  # noqa: E402
from moe_sparsify.models import bundled_model_dir, load_model  # noqa: E402
from moe_sparsify.prune import plan_pruning  # noqa: E402

CPU = torch.device("cpu")
RUNS = [
    ("exhaustive layerwise", {"strategy": "exhaustive", "mode": "layerwise"}),
    ("exhaustive progressive", {"strategy": "exhaustive", "mode": "progressive"}),
    ("greedy", {"strategy": "greedy"}),
    ("reap", {"strategy": "reap"}),
    ("frequency", {"strategy": "frequency"}),
    ("e2e", {"strategy": "e2e"}),
]


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = sorted({r["keep"] for r in rows if r["keep"] != 8}, reverse=True)
    names = [r["strategy"] for r in rows if r["keep"] == keeps[0]]
    original = next(r["perplexity"] for r in rows if r["keep"] == 8)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(keeps)
    for i, keep in enumerate(keeps):
        values = [next(r["perplexity"] for r in rows if r["keep"] == keep and r["strategy"] == n) for n in names]
        xs = [j + (i - (len(keeps) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, values, width, label=f"keep {keep} of 8")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(original, color="black", linestyle="--", linewidth=1, label=f"original ({original:.1f})")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title("Pruning strategies on the bundled 8-expert model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("docs/quality"))
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, tokenizer = load_model(bundled_model_dir("tiny"), torch.float32)
    adapter = adapter_for(model.config)
    tokens, manifest = sample_windows(tokenizer, parse_sources("bundled"), args.samples, args.seq_len, seed=0)
    heldout = token_stream(tokenizer, load_documents("bundled:heldout"))
    windows = heldout[: len(heldout) // 256 * 256].reshape(-1, 256)
    reference = next_token_log_probs(model, windows, CPU)

    def score(kept) -> dict:
        with adapter.pruned_view(model, kept):
            return {
                "perplexity": perplexity(model, heldout, 256, 128, CPU)["perplexity"],
                "kl": mean_kl(model, windows, reference, CPU),
            }

    def plan(keep: int, **overrides):
        settings = Settings(model="tiny", keep=keep, batch_size=16, seq_len=args.seq_len, **overrides)
        start = time.perf_counter()
        result, _ = plan_pruning(model, adapter, settings, tokens, manifest, device=CPU)
        return result, time.perf_counter() - start

    rows = [{"keep": 8, "strategy": "original", **score({}), "search_s": 0.0}]
    for keep in args.keep:
        for name, overrides in RUNS:
            result, seconds = plan(keep, **overrides)
            rows.append(
                {"keep": keep, "strategy": name, **score(result.kept()), "search_s": seconds, "kept": result.kept()}
            )
        randoms = [score(plan(keep, strategy="random", seed=seed)[0].kept()) for seed in range(args.random_seeds)]
        rows.append(
            {
                "keep": keep,
                "strategy": f"random (mean of {len(randoms)})",
                "perplexity": statistics.mean(r["perplexity"] for r in randoms),
                "kl": statistics.mean(r["kl"] for r in randoms),
                "search_s": None,
            }
        )
        best = min(randoms, key=lambda r: r["perplexity"])
        rows.append({"keep": keep, "strategy": "random (best seed)", **best, "search_s": None})

    print(
        f"bundled tiny model; calibration {args.samples}x{args.seq_len} tokens; held-out split "
        f"{len(heldout)} tokens; CPU, float32, 2 threads"
    )
    print(f"{'keep':>4}  {'strategy':<24} {'perplexity':>10} {'KL':>7} {'search s':>9}")
    for r in rows:
        search = "-" if r["search_s"] is None else f"{r['search_s']:.1f}"
        print(f"{r['keep']:>4}  {r['strategy']:<24} {r['perplexity']:>10.2f} {r['kl']:>7.4f} {search:>9}")
    for keep in args.keep:
        by = {r["strategy"]: r for r in rows if r["keep"] == keep}
        print(
            f"keep {keep}: e2e search cost {by['e2e']['search_s'] / by['exhaustive layerwise']['search_s']:.1f}x "
            f"exhaustive layerwise"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        chart(rows, args.out / "quality.png")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[report]')", file=sys.stderr)


if __name__ == "__main__":
    main()
