"""What the e2e searches cost at Mixtral-8x7B's shapes, on paper, against the exhaustive search.

    python scripts/e2e_cost_on_paper.py                        # Mixtral-8x7B, 128 x 2048 calibration tokens
    python scripts/e2e_cost_on_paper.py --race-share 0.5 --keep 6

The closed forms of `moe_sparsify.cost` (the counts its hooks make, tested equal to them on small
models) with the per-token FLOPs of transformers' default MixtralConfig, which has Mixtral-8x7B's
shapes (32 layers, hidden 4096, expert width 14336, 32 heads / 8 KV heads, vocabulary 32000, 8
experts, top-2). A race's savings depend on the model and the data: --race-share is the share of
the shortlist's (subset, sequence) pairs it is assumed to score at every layer; each raced row is
also given with no drops (every pair scored), its worst case. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import MixtralConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.cost import TokenFlops, e2e_search_cost, exhaustive_search_cost  # noqa: E402

# name: (shortlist, e2e sequences, horizon (None: the logits), raced, first MoE layers read at the logits)
SEARCHES = {
    "e2e (16 subsets, 64 seq., logits)": (16, 64, None, False, 0),
    "earlier e2e-fast (8, 16, horizon 1)": (8, 16, 1, False, 0),
    "e2e-fast without logits layers (16, 64, horizon 1, race)": (16, 64, 1, True, 0),
    "e2e-fast (16, 64, horizon 1, race, layer 0 at the logits)": (16, 64, 1, True, 1),
}


def search_flops(per: TokenFlops, cost) -> float:
    return cost.layer_tokens * per.layer + cost.head_tokens * per.head + cost.expert_tokens * per.expert


def e2e_flops(per, layers, tokens, seq_len, candidates, search, share: float) -> float:
    """FLOPs of one e2e search (a row of SEARCHES), its race scoring `share` of the pairs at every layer."""
    shortlist, sequences, horizon, raced, logits_layers = search
    stops = [
        layers if horizon is None or layer < logits_layers else min(layers, layer + 1 + horizon)
        for layer in range(layers)
    ]
    rescored = sequences * seq_len
    pairs = [(share if raced else 1) * shortlist * rescored] * layers
    return search_flops(per, e2e_search_cost(layers, tokens, rescored, candidates, stops, pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--race-share", type=float, default=0.3, help="share of (subset, sequence) pairs a race scores")
    args = ap.parse_args()
    config = MixtralConfig()
    per = TokenFlops.of(config, args.seq_len)
    layers, experts, top_k = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    tokens = args.samples * args.seq_len
    print(f"per token: expert {per.expert / 1e6:.0f}, layer {per.layer / 1e6:.0f}, head {per.head / 1e6:.0f} MFLOP")
    print(f"| keep | exhaustive | {' | '.join(SEARCHES)} |")
    print(f"|---|---|{'---|' * len(SEARCHES)}")
    for keep in args.keep:
        candidates = top_k + experts - keep  # a token's new top-k lies in its original top-(k + n - keep)
        exhaustive = search_flops(per, exhaustive_search_cost(layers, tokens, candidates))
        cells = [f"{exhaustive / 1e15:.1f} PFLOP"]
        for search in SEARCHES.values():
            shares = (args.race_share, 1)
            assumed, worst = (e2e_flops(per, layers, tokens, args.seq_len, candidates, search, s) for s in shares)
            cell = f"{assumed / 1e15:.1f} PFLOP ({assumed / exhaustive:.2f}x)"
            if search[3]:  # raced
                cell += f"; no drops {worst / 1e15:.0f} PFLOP ({worst / exhaustive:.2f}x)"
            cells.append(cell)
        print(f"| {keep} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
