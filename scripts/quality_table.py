"""Held-out perplexity of each pruning strategy on the bundled model.

    python scripts/quality_table.py                 # keep 6 and 4, ~2 min on 2 CPU cores
    python scripts/quality_table.py --keep 6 --json-out table.json

Calibrates once (the bundled calib split), plans with every strategy, applies
each plan in memory and scores the bundled held-out split (which neither
training nor calibration saw). Random is run with 5 seeds: mean and best.
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
from moe_sparsify.evaluate import perplexity  # noqa: E402
from moe_sparsify.models import bundled_model_dir, load_model  # noqa: E402
from moe_sparsify.prune import plan_pruning  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, tokenizer = load_model(bundled_model_dir("tiny"), torch.float32)
    adapter = adapter_for(model.config)
    tokens, manifest = sample_windows(tokenizer, parse_sources("bundled"), args.samples, args.seq_len, seed=0)
    heldout = token_stream(tokenizer, load_documents("bundled:heldout"))

    def ppl(kept) -> float:
        with adapter.pruned_view(model, kept):
            return perplexity(model, heldout, 256, 128, CPU)["perplexity"]

    rows = [{"keep": 8, "strategy": "original", "perplexity": ppl({}), "search_s": 0.0}]
    runs = [
        ("exhaustive", "layerwise", 0),
        ("exhaustive", "progressive", 0),
        ("greedy", "layerwise", 0),
        ("frequency", "layerwise", 0),
    ] + [("random", "layerwise", s) for s in range(args.random_seeds)]
    for keep in args.keep:
        random_ppls = []
        for strategy, mode, seed in runs:
            settings = Settings(model="tiny", keep=keep, strategy=strategy, mode=mode, seed=seed, batch_size=16)
            start = time.perf_counter()
            plan, _ = plan_pruning(model, adapter, settings, tokens, manifest, device=CPU)
            seconds = time.perf_counter() - start
            value = ppl(plan.kept())
            if strategy == "random":
                random_ppls.append(value)
                continue
            rows.append(
                {
                    "keep": keep,
                    "strategy": f"{strategy} {mode}" if strategy == "exhaustive" else strategy,
                    "perplexity": value,
                    "search_s": seconds,
                }
            )
        if random_ppls:
            rows.append(
                {
                    "keep": keep,
                    "strategy": f"random mean of {len(random_ppls)}",
                    "perplexity": statistics.mean(random_ppls),
                    "search_s": None,
                }
            )
            rows.append({"keep": keep, "strategy": "random best", "perplexity": min(random_ppls), "search_s": None})

    print(f"held-out perplexity, bundled tiny model, {args.samples}x{args.seq_len} calibration tokens")
    print(f"{'keep':>4}  {'strategy':<24} {'perplexity':>10} {'search s':>9}")
    for r in rows:
        search = "-" if r["search_s"] is None else f"{r['search_s']:.1f}"
        print(f"{r['keep']:>4}  {r['strategy']:<24} {r['perplexity']:>10.3f} {search:>9}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
