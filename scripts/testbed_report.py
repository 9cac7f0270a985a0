"""Is the bundled model a usable test bed? Routing frequencies and what dropping experts costs.

    python scripts/testbed_report.py      # ~30 s on 2 CPU cores

Prints, per layer, the share of top-2 routing each expert gets on the bundled
calib split (a uniform router gives 12.5 % each), then held-out perplexity of
the original, of dropping each layer's 2 most-used experts, and of dropping
its 2 least-used. Last line: one JSON object with all numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.calibration.propagate import propagate  # noqa: E402
from moe_sparsify.calibration.sources import load_documents, parse_sources  # noqa: E402
from moe_sparsify.calibration.tokens import sample_windows, token_stream  # noqa: E402
from moe_sparsify.evaluate import perplexity  # noqa: E402
from moe_sparsify.models import bundled_model_dir, load_model  # noqa: E402
from moe_sparsify.routing import selection_counts  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_model(bundled_model_dir("tiny"), torch.float32)
    adapter = adapter_for(model.config)
    n = adapter.num_experts
    tokens, _ = sample_windows(tokenizer, parse_sources("bundled"), 128, 256, seed=0)
    shares: dict[int, list[float]] = {}

    def count(step):
        counts = sum(selection_counts(adapter.route(step.block, x)[1], n) for x in step.inputs)
        shares[step.index] = (counts / counts.sum()).tolist()

    propagate(model, adapter, tokens, count, batch_size=16, device=CPU)
    order = {layer: sorted(range(n), key=lambda e: -s[e]) for layer, s in shares.items()}
    heldout = token_stream(tokenizer, load_documents("bundled:heldout"))

    def ppl(dropped: dict[int, list[int]]) -> float:
        kept = {layer: [e for e in range(n) if e not in d] for layer, d in dropped.items()}
        with adapter.pruned_view(model, kept):
            return perplexity(model, heldout, 256, 128, CPU)["perplexity"]

    result = {
        "routing_share": shares,
        "original": ppl({}),
        "drop_2_most_used": ppl({layer: o[:2] for layer, o in order.items()}),
        "drop_2_least_used": ppl({layer: o[-2:] for layer, o in order.items()}),
    }
    print("routing share per expert (%), top-2 on 32k calib tokens")
    for layer, s in shares.items():
        print(f"  layer {layer}: " + " ".join(f"{100 * v:5.1f}" for v in s) + f"   (max/min {max(s) / min(s):.1f})")
    print(
        f"held-out perplexity: original {result['original']:.3f}, drop 2 most-used {result['drop_2_most_used']:.3f}, "
        f"drop 2 least-used {result['drop_2_least_used']:.3f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
