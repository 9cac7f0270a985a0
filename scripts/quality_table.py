"""Held-out perplexity and KL to the original of every pruning strategy on the bundled model.

    python scripts/quality_table.py                      # keep 6 and 4, ~10 min on 2 CPU cores
    python scripts/quality_table.py --keep 6 --out docs/quality
    python scripts/quality_table.py --model DIR --calibration a.txt --heldout b.txt --runs e2e "e2e + router + refit"
    python scripts/quality_table.py --samples 8 --seq-len 64 --keep 6 --random-seeds 0 --runs e2e e2e-fast  # a tiny run

Calibrates once (the bundled calib split), plans with every strategy, applies
each plan in memory and scores the bundled held-out split (which neither
training nor calibration saw): perplexity (sliding window 256, stride 128)
and the mean per-token KL(original || pruned) of next-token distributions on
non-overlapping 256-token windows. Random runs 5 seeds: mean and best. Search
time is the planning time of each strategy on the same tokens; cost is what it
computed (decoder-layer, head and expert forwards x tokens, counted by hooks,
as FLOPs: `moe_sparsify.cost`) over the exhaustive layer-wise search's, a
ratio that does not depend on machine load. Writes
OUT/quality.json and, with matplotlib installed (pip install -e ".[report]"),
OUT/quality.png.
"""

from __future__ import annotations

import argparse
import copy
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
from moe_sparsify.cost import SearchCost  # noqa: E402
from moe_sparsify.evaluate import mean_kl, next_token_log_probs, perplexity  # noqa: E402
from moe_sparsify.models import load_model, resolve_model_dir  # noqa: E402
from moe_sparsify.prune import plan_pruning  # noqa: E402

RUNS = [
    ("exhaustive layerwise", {"strategy": "exhaustive", "mode": "layerwise"}),
    ("exhaustive progressive", {"strategy": "exhaustive", "mode": "progressive"}),
    ("exhaustive compensating", {"strategy": "exhaustive", "mode": "compensating"}),
    ("greedy", {"strategy": "greedy"}),
    ("reap", {"strategy": "reap"}),
    ("frequency", {"strategy": "frequency"}),
    ("e2e", {"strategy": "e2e"}),
    ("e2e compensating", {"strategy": "e2e", "mode": "compensating"}),
    ("e2e-fast", {"strategy": "e2e-fast"}),  # e2e read one layer ahead past layer 0, its shortlist raced
    # Recovery after the search (prune --recover): each kept only where held-back calibration tokens improve.
    ("exhaustive + router", {"strategy": "exhaustive", "recover": ["router"]}),
    ("exhaustive + refit", {"strategy": "exhaustive", "recover": ["refit"]}),
    ("exhaustive + router + refit", {"strategy": "exhaustive", "recover": ["router", "refit"]}),
    (
        "exhaustive compensating + router + refit",
        {"strategy": "exhaustive", "mode": "compensating", "recover": ["router", "refit"]},
    ),
    ("e2e + router + refit", {"strategy": "e2e", "recover": ["router", "refit"]}),
    # Merging removed experts into kept ones (M-SMoE / HC-SMoE), before router and refit where combined.
    ("exhaustive + merge", {"strategy": "exhaustive", "recover": ["merge"]}),
    ("exhaustive + merge + router + refit", {"strategy": "exhaustive", "recover": ["merge", "router", "refit"]}),
    ("e2e + merge", {"strategy": "e2e", "recover": ["merge"]}),
    # ... with each removed expert's neurons first permuted to match its kept expert's (recover_merge_align).
    ("exhaustive + merge aligned", {"strategy": "exhaustive", "recover": ["merge"], "recover_merge_align": True}),
    (
        "exhaustive compensating + merge + router + refit",
        {"strategy": "exhaustive", "mode": "compensating", "recover": ["merge", "router", "refit"]},
    ),
    (
        "exhaustive compensating + merge aligned + router + refit",
        {
            "strategy": "exhaustive",
            "mode": "compensating",
            "recover": ["merge", "router", "refit"],
            "recover_merge_align": True,
        },
    ),
    ("e2e + merge aligned", {"strategy": "e2e", "recover": ["merge"], "recover_merge_align": True}),
    ("e2e + merge by router logits", {"strategy": "e2e", "recover": ["merge"], "recover_merge_by": "router"}),
    ("e2e + merge + router + refit", {"strategy": "e2e", "recover": ["merge", "router", "refit"]}),
    ("e2e compensating + router + refit", {"strategy": "e2e", "mode": "compensating", "recover": ["router", "refit"]}),
]


def changed_bytes(model, recovered, adapter, kept: dict[int, list[int]]) -> int:
    """Bytes of the exported weights that differ from the source's: kept experts' rows of each parameter
    recovery may change (router rows, every expert tensor) that are not bit-identical."""
    from moe_sparsify.recover import recoverable_parameters

    total = 0
    for index, experts in kept.items():
        blocks = [adapter.moe_block(adapter.decoder_layers(m)[index]) for m in (model, recovered)]
        for before, after in zip(*(recoverable_parameters(adapter, b, whole_experts=True) for b in blocks)):
            for e in experts:
                if not torch.equal(before[e], after[e]):
                    total += after[e].numel() * after[e].element_size()
    return total


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = sorted({r["keep"] for r in rows if r["keep"] != 8}, reverse=True)
    measured = {(r["keep"], r["strategy"]) for r in rows}
    names = [r["strategy"] for r in rows if r["keep"] == keeps[0]]
    names = [n for n in names if all((k, n) in measured for k in keeps)]  # rows measured at every keep
    original = next(r["perplexity"] for r in rows if r["keep"] == 8)
    fig, ax = plt.subplots(figsize=(14, 6))
    width = 0.8 / len(keeps)
    for i, keep in enumerate(keeps):
        values = [next(r["perplexity"] for r in rows if r["keep"] == keep and r["strategy"] == n) for n in names]
        xs = [j + (i - (len(keeps) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, values, width, label=f"keep {keep} of 8")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(original, color="black", linestyle="--", linewidth=1, label=f"original ({original:.1f})")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
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
    ap.add_argument("--model", default="tiny", help="alias or model directory (default: the bundled model)")
    ap.add_argument("--calibration", default="bundled", help="calibration source, as prune --calibration")
    ap.add_argument("--heldout", default="bundled:heldout", help="held-out text source")
    ap.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (float32 either way)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--batch-size", type=int, default=16, help="calibration sequences per batch (prune's default is 8)")
    ap.add_argument("--runs", nargs="+", default=[name for name, _ in RUNS], help="rows to run (default: all)")
    args = ap.parse_args()
    unknown = set(args.runs) - {name for name, _ in RUNS}
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {[name for name, _ in RUNS]}")
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model, tokenizer = load_model(resolve_model_dir(args.model), torch.float32)
    model.to(device)
    adapter = adapter_for(model.config)
    tokens, manifest = sample_windows(tokenizer, parse_sources(args.calibration), args.samples, args.seq_len, seed=0)
    heldout = token_stream(tokenizer, load_documents(args.heldout))
    windows = heldout[: len(heldout) // 256 * 256].reshape(-1, 256)
    reference = next_token_log_probs(model, windows, device)

    def score(kept, scored=model) -> dict:
        with adapter.pruned_view(scored, kept):
            return {
                "perplexity": perplexity(scored, heldout, 256, 128, device)["perplexity"],
                "kl": mean_kl(scored, windows, reference, device),
            }

    def plan(keep: int, pruned=model, **overrides):
        """pruned: the model the run may change (recovery re-fits kept weights in place).
        Returns the plan, its planning time and the FLOPs its search computed."""
        settings = Settings(model=args.model, keep=keep, batch_size=args.batch_size, seq_len=args.seq_len, **overrides)
        cost = SearchCost()
        start = time.perf_counter()
        result, _ = plan_pruning(pruned, adapter, settings, tokens, manifest, device=device, cost=cost)
        return result, time.perf_counter() - start, cost.flops(model.config, args.seq_len)

    rows = [{"keep": 8, "strategy": "original", **score({}), "search_s": 0.0, "changed_bytes": 0}]
    for keep in args.keep:
        # The unit of cost: the paper's exhaustive layer-wise search on the same tokens.
        exhaustive_flops = plan(keep, strategy="exhaustive", mode="layerwise")[2]
        for name, overrides in (run for run in RUNS if run[0] in args.runs):
            pruned = copy.deepcopy(model) if overrides.get("recover") else model
            result, seconds, flops = plan(keep, pruned, **overrides)
            kept = result.kept()
            rows.append(
                {
                    "keep": keep,
                    "strategy": name,
                    **score(kept, pruned),
                    "search_s": seconds,
                    "cost": flops / exhaustive_flops,
                    "changed_bytes": changed_bytes(model, pruned, adapter, kept),
                    "kept": kept,
                    "recover": result.options.get("recover"),
                }
            )
            done = rows[-1]  # progress on stderr: a long table shows its rows as they come
            print(f"keep {keep} {name}: perplexity {done['perplexity']:.2f} kl {done['kl']:.4f}", file=sys.stderr)
        if not args.random_seeds:
            continue
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
        f"{args.model}; calibration {args.samples}x{args.seq_len} tokens; held-out split "
        f"{len(heldout)} tokens; {device}, float32, {args.threads} threads; "
        "cost: FLOPs over the exhaustive layer-wise search's"
    )
    print(f"{'keep':>4}  {'strategy':<42} {'perplexity':>10} {'KL':>7} {'search s':>9} {'cost':>6} {'changed B':>10}")
    for r in rows:
        search = "-" if r["search_s"] is None else f"{r['search_s']:.1f}"
        cost = "-" if r.get("cost") is None else f"{r['cost']:.1f}x"
        changed = r.get("changed_bytes")
        changed = "-" if changed is None else str(changed)
        print(
            f"{r['keep']:>4}  {r['strategy']:<42} {r['perplexity']:>10.2f} {r['kl']:>7.4f} {search:>9} {cost:>6} "
            f"{changed:>10}"
        )
    for keep in args.keep:
        by = {r["strategy"]: r for r in rows if r["keep"] == keep}
        if "e2e" not in by:
            continue
        best = min((r for r in by.values() if r["strategy"] != "e2e"), key=lambda r: r["perplexity"], default=None)
        if best is not None:
            cut = 1 - best["perplexity"] / by["e2e"]["perplexity"]
            print(f"keep {keep}: best {best['strategy']!r} cuts held-out perplexity {cut:.1%} against e2e")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        chart(rows, args.out / "quality.png")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[report]')", file=sys.stderr)


if __name__ == "__main__":
    main()
