"""`eval --compare --report DIR`: the comparison as JSON plus PNG charts (matplotlib, the `report` extra)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--report draws with matplotlib: pip install 'moe-sparsify[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setup_line(setup: dict) -> str:
    return (
        f"{setup['device']}, {setup['dtype']}, batch {setup['batch']}, prompt {setup['prompt_len']}, "
        f"{setup['new_tokens']} new tokens, median of {setup['repeats']}"
    )


def _label(variant: str) -> str:
    """A variant as charts show it: the last path component of the model, with its skip suffix."""
    model, plus, skip = variant.partition("+")
    return Path(model.rstrip("/")).name + (plus + Path(skip).name if plus else "")


def write_report(result: dict, directory: Path) -> dict:
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    rows, setup = result["variants"], result["setup"]
    names = [_label(r["variant"]) for r in rows]
    files = {"json": directory / "comparison.json"}
    files["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    same_size: dict[int, int] = {}
    for r in rows:
        ax.scatter(r["parameters"] / 1e6, r["perplexity"], s=40)
        stacked = same_size.get(r["parameters"], 0)  # variants of one size (skipping) get stacked labels
        same_size[r["parameters"]] = stacked + 1
        ax.annotate(
            _label(r["variant"]),
            (r["parameters"] / 1e6, r["perplexity"]),
            textcoords="offset points",
            xytext=(6, 6 - 12 * stacked),
            fontsize=8,
        )
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"perplexity on {setup['text']} (lower is better)")
    ax.set_title("Quality against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["quality"] = directory / "quality_vs_parameters.png"
    fig.savefig(files["quality"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    width = 0.38
    xs = range(len(rows))
    for offset, key, label in ((-width / 2, "prefill_speedup", "prefill"), (width / 2, "decode_speedup", "decode")):
        bars = ax.bar([x + offset for x in xs], [r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=15, ha="right")
    ax.set_ylabel(f"tokens/s relative to {names[0]}")
    ax.set_title(f"Speed ({_setup_line(setup)})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    files["speed"] = directory / "speedup.png"
    fig.savefig(files["speed"], dpi=120)
    plt.close(fig)

    pruned = [r for r in rows if r.get("kept_experts")]
    if pruned:
        fig, axes = plt.subplots(1, len(pruned), figsize=(3.2 * len(pruned), 3.2), squeeze=False)
        for ax, r in zip(axes[0], pruned):
            layers = sorted(r["kept_experts"], key=int)
            grid = [
                [1 if e in r["kept_experts"][layer] else 0 for e in range(r["original_experts"])] for layer in layers
            ]
            ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
            ax.set_title(_label(r["variant"]), fontsize=9)
            ax.set_xlabel("original expert id")
            ax.set_ylabel("MoE layer")
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.suptitle("Experts kept (green) per layer")
        fig.tight_layout()
        files["kept"] = directory / "kept_experts.png"
        fig.savefig(files["kept"], dpi=120)
        plt.close(fig)

    skipping = [r for r in rows if r.get("skip_fraction")]
    if skipping:
        layers = sorted({int(k) for r in skipping for k in r["skip_fraction"]})
        grid = [
            [100 * r["skip_fraction"].get(layer, r["skip_fraction"].get(str(layer), 0.0)) for layer in layers]
            for r in skipping
        ]
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(layers) + 2), 1 + 0.6 * len(skipping)))
        image = ax.imshow(grid, cmap="Blues", vmin=0, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0f}%", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(skipping)), [_label(r["variant"]) for r in skipping])
        ax.set_xlabel("MoE layer")
        fig.colorbar(image, ax=ax, label="expert evaluations skipped (%)")
        ax.set_title("Realised skip share per layer")
        files["skip"] = directory / "skip_fractions.png"
        fig.savefig(files["skip"], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return {k: str(v) for k, v in files.items()}
