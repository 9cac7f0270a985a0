"""How much the Gram-statistics search saves over the paper's one-forward-per-subset search.

    python scripts/bench_search.py                    # CPU, ~1 min on 2 cores
    python scripts/bench_search.py --hidden 256 --intermediate 896 --tokens 4096   # quicker
    python scripts/bench_search.py --device cuda --hidden 4096 --intermediate 14336 --tokens 262144

One Mixtral-shaped MoE block with random weights (8 experts, top-2) and random
inputs. Times, in one run and on the same tokens:
  - exhaustive search at keep 6 (28 subsets) and keep 4 (70 subsets), each
    including the pass over candidate experts that builds the statistics
    (median of --repeats runs);
  - the naive search: one masked forward of the block per subset, timed on
    every subset over a slice of the tokens and scaled to all of them (its cost
    is linear in tokens).
Then a 64-expert top-8 block (OLMoE's routing: softmax without renormalisation)
pruned to --many-keep experts by greedy elimination (exhaustive is out of
reach: C(64, 32) subsets): its time (statistics pass + greedy) over one
all-expert forward (every expert on every token). The same for a DeepSeek-V3
block with group-limited routing (64 experts in 8 groups, 4 chosen, top-8),
where greedy keeps an equal share per group and scores every child subset.
Last line: one JSON object with keep4_over_keep6 (goal <= 1.5),
speedup_vs_naive (goal >= 10; the smaller of the keep-6 and keep-4 speedups),
greedy64_over_all_expert_forward and grouped64_over_all_expert_forward.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.objective import SubsetLoss  # noqa: E402
from moe_sparsify.prune import layer_stats  # noqa: E402
from moe_sparsify.search import SearchContext, exhaustive, greedy  # noqa: E402
from moe_sparsify.timing import timed  # noqa: E402


def fast_search(adapter, block, x, keep, chunk, device):
    def search():
        stats = layer_stats(adapter, block, x.split(chunk), keep)
        return exhaustive(SubsetLoss(stats), keep, SearchContext(layer=0))

    return timed(search, device)


def naive_search(adapter, block, x, keep, chunk, device):
    """The paper's way: a masked forward per subset, loss against the full output."""
    n = adapter.num_experts

    def search():
        reference = [adapter.routed_forward(block, part, None) for part in x.split(chunk)]
        losses = []
        for subset in itertools.combinations(range(n), keep):
            mask = torch.zeros(n, dtype=torch.bool, device=device)
            mask[list(subset)] = True
            loss = sum(
                ((adapter.routed_forward(block, part, mask) - ref).float() ** 2).sum()
                for part, ref in zip(x.split(chunk), reference)
            )
            losses.append((loss.item() / len(x), subset))
        return min(losses)

    return timed(search, device)


def _olmoe_block(args):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.many_intermediate,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
    )
    return config, OlmoeSparseMoeBlock(config)


def _grouped_block(args):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=args.hidden,
        moe_intermediate_size=args.many_intermediate,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
    )
    return config, DeepseekV3MoE(config)


def many_experts(args, device, dtype, make_block) -> dict:
    config, block = make_block(args)
    block = block.to(device=device, dtype=dtype).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=args.hidden**-0.5)
    adapter = adapter_for(config)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)

    def all_experts():
        for part in x.split(args.chunk):
            for e in range(64):
                adapter.expert_forward(block, part, e)

    with torch.no_grad():
        all_expert_s, _ = timed(all_experts, device)
        stats_s, stats = timed(lambda: layer_stats(adapter, block, x.split(args.chunk), args.many_keep), device)
        greedy_s, result = timed(lambda: greedy(SubsetLoss(stats), args.many_keep, SearchContext(layer=0)), device)
    return {
        "experts": 64,
        "top_k": 8,
        "groups": adapter.routing_groups,
        "keep": args.many_keep,
        "candidates_per_token": stats.num_candidates,
        "all_expert_forward_s": all_expert_s,
        "stats_s": stats_s,
        "greedy_s": greedy_s,
        "subsets_scored": result.subsets_scored,
        "ratio": (stats_s + greedy_s) / all_expert_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Wide enough that expert matmuls dominate, as they do in Mixtral (4096 / 14336, the same 3.5x ratio).
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1792)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--naive-fraction", type=float, default=0.125, help="share of tokens the naive search runs on")
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per batch handed to the search")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="fast searches per keep; the median is reported")
    ap.add_argument("--many-keep", type=int, default=32, help="experts kept of 64 in the greedy case")
    ap.add_argument("--many-intermediate", type=int, default=256, help="expert width in the 64-expert case")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    config = MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_local_experts=8, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(config).to(device=device, dtype=dtype).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=args.hidden**-0.5)
    adapter = adapter_for(config)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    naive_tokens = max(1, int(args.tokens * args.naive_fraction))

    with torch.no_grad():
        for keep in (6, 4):  # warm-up: allocator and kernel caches for both shapes
            fast_search(adapter, block, x[: args.chunk], keep, args.chunk, device)
        rows = {}
        for keep in (6, 4):
            runs = [fast_search(adapter, block, x, keep, args.chunk, device) for _ in range(args.repeats)]
            fast_s, fast = statistics.median(r[0] for r in runs), runs[0][1]
            naive_s, (naive_loss, naive_kept) = naive_search(adapter, block, x[:naive_tokens], keep, args.chunk, device)
            _, on_slice = fast_search(adapter, block, x[:naive_tokens], keep, args.chunk, device)
            rows[keep] = {
                "fast_s": fast_s,
                "naive_s_scaled": naive_s * args.tokens / naive_tokens,
                "subsets": fast.subsets_scored,
                "same_choice_on_slice": on_slice.kept == naive_kept,
            }

    print(
        f"block: hidden {args.hidden}, intermediate {args.intermediate}, 8 experts, top-2, {args.tokens} tokens, "
        f"{args.device} {args.dtype}; naive timed on {naive_tokens} tokens and scaled",
        file=sys.stderr,
    )
    print(f"{'keep':>4} {'subsets':>7} {'fast s':>8} {'naive s':>9} {'speedup':>8} {'same choice':>11}")
    for keep, r in rows.items():
        print(
            f"{keep:>4} {r['subsets']:>7} {r['fast_s']:>8.2f} {r['naive_s_scaled']:>9.1f} "
            f"{r['naive_s_scaled'] / r['fast_s']:>8.1f} {str(r['same_choice_on_slice']):>11}"
        )
    many = many_experts(args, device, dtype, _olmoe_block)
    grouped = many_experts(args, device, dtype, _grouped_block)
    for label, case in (("64 experts, top-8", many), ("64 experts in 8 groups (4 chosen), top-8", grouped)):
        print(
            f"{label}, keep {case['keep']}: {case['candidates_per_token']} candidates/token, statistics "
            f"{case['stats_s']:.2f} s + greedy {case['greedy_s']:.2f} s ({case['subsets_scored']} subsets) = "
            f"{case['ratio']:.1f}x one all-expert forward ({case['all_expert_forward_s']:.2f} s)"
        )
    summary = {
        "keep4_over_keep6": rows[4]["fast_s"] / rows[6]["fast_s"],
        "greedy64_over_all_expert_forward": many["ratio"],
        "grouped64_over_all_expert_forward": grouped["ratio"],
        "speedup_vs_naive": min(r["naive_s_scaled"] / r["fast_s"] for r in rows.values()),
        "tokens": args.tokens,
        "device": args.device,
        "rows": rows,
        "many_experts": many,
        "grouped_experts": grouped,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
