"""`eval --compare --report DIR`: the comparison as JSON plus PNG charts (matplotlib, the `report` extra)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def pyplot():
    """matplotlib's pyplot, drawing to files; `eval --compare --report` calls it first, before any model loads."""
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
        f"{setup['new_tokens']} new tokens"
    )


def _label(variant: str) -> str:
    """A variant as charts show it: the last path component of the model, with its skip suffix."""
    model, plus, skip = variant.partition("+")
    return Path(model.rstrip("/")).name + (plus + Path(skip).name if plus else "")


def write_report(result: dict, directory: Path) -> dict:
    """comparison.json and one chart per view: quality against size, speed-ups, and, where variants
    have them, the experts kept and the realised skip shares. Returns {name: path written}."""
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    rows, setup = result["variants"], result["setup"]
    files = {"json": directory / "comparison.json"}
    files["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    files["quality"] = _quality_chart(plt, rows, setup, directory / "quality_vs_parameters.png")
    files["speed"] = _speed_chart(plt, rows, setup, result["noise"][str(setup["batch"])], directory / "speedup.png")
    pruned = [r for r in rows if r.get("kept_experts")]
    if pruned:
        files["kept"] = _kept_chart(plt, pruned, directory / "kept_experts.png")
    skipping = [r for r in rows if r.get("skip_fraction")]
    if skipping:
        files["skip"] = _skip_chart(plt, skipping, directory / "skip_fractions.png")
    return {k: str(v) for k, v in files.items()}


def _quality_chart(plt, rows: list[dict], setup: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Variants of one size (a model with and without skipping) can land on one spot: each gets its own
    # marker and a smaller size than the one drawn before it, so none hides another; a legend names them
    # instead of labels that would collide or run off the right edge.
    markers = "osD^vP*Xh<>p"
    for i, r in enumerate(rows):
        ax.scatter(
            r["parameters"] / 1e6,
            r["perplexity"],
            s=max(140 - 25 * i, 30),
            marker=markers[i % len(markers)],
            facecolors="none" if i else None,
            edgecolors=f"C{i}",
            color=f"C{i}",
            linewidths=1.6,
            label=f"{_label(r['variant'])} ({r['perplexity']:.1f})",
            zorder=2 + i,
        )
    ax.margins(x=0.15, y=0.12)
    ax.legend(fontsize=8, title="variant (perplexity)", title_fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"perplexity on {setup['text']} (lower is better)")
    ax.set_title("Quality against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _speed_chart(plt, rows: list[dict], setup: dict, headline: dict, path: Path) -> Path:
    """Prefill and decode speed-ups against the first variant at the headline batch size, with their intervals."""
    names = [_label(r["variant"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    width = 0.38
    xs = range(len(rows))
    for offset, kind in ((-width / 2, "prefill"), (width / 2, "decode")):
        medians = [r[f"{kind}_speedup"] for r in rows]
        errors = [
            [m - r[f"{kind}_speedup_interval"][0] for m, r in zip(medians, rows)],
            [r[f"{kind}_speedup_interval"][1] - m for m, r in zip(medians, rows)],
        ]
        bars = ax.bar([x + offset for x in xs], medians, width, yerr=errors, capsize=4, label=kind)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8, label_type="center")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=15, ha="right")
    ax.set_ylabel(f"tokens/s relative to {names[0]}")
    ax.set_title(
        f"Speed-up, median of {headline['rounds']} rounds; bars: {100 * headline['interval_coverage']:.0f} % "
        f"interval\n{_setup_line(setup)}",
        fontsize=9,
    )
    highest = max(r[f"{kind}_speedup_interval"][1] for r in rows for kind in ("prefill", "decode"))
    ax.set_ylim(0, 1.12 * highest)  # room for the top error bar
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a bar
    if headline["noisy"]:
        ax.set_xlabel(
            "NOISY: intervals wider than 10 % of their median; do not quote these speed-ups",
            color="darkred",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _kept_chart(plt, pruned: list[dict], path: Path) -> Path:
    """Per pruned variant, a layer x original-expert grid: green where the expert was kept."""
    fig, axes = plt.subplots(1, len(pruned), figsize=(3.2 * len(pruned), 3.2), squeeze=False)
    for ax, r in zip(axes[0], pruned):
        layers = sorted(r["kept_experts"], key=int)
        grid = [[1 if e in r["kept_experts"][layer] else 0 for e in range(r["original_experts"])] for layer in layers]
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
        ax.set_title(_label(r["variant"]), fontsize=9)
        ax.set_xlabel("original expert id")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    fig.suptitle("Experts kept (green) per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _skip_chart(plt, skipping: list[dict], path: Path) -> Path:
    """Variant x MoE layer: the share of expert evaluations skipped, in per cent."""
    layers = sorted({int(k) for r in skipping for k in r["skip_fraction"]})
    grid = [
        [100 * r["skip_fraction"].get(layer, r["skip_fraction"].get(str(layer), 0.0)) for layer in layers]
        for r in skipping
    ]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(layers) + 2), 1 + 0.6 * len(skipping)))
    image = ax.imshow(grid, cmap="Blues", vmin=0, aspect="auto")
    low, high = image.get_clim()
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            dark = value > low + 0.55 * (high - low)  # white text on the dark end of the colour map
            ax.text(j, i, f"{value:.0f}%", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(len(skipping)), [_label(r["variant"]) for r in skipping])
    ax.set_xlabel("MoE layer")
    fig.colorbar(image, ax=ax, label="expert evaluations skipped (%)")
    ax.set_title("Realised skip share per layer")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
