"""What dynamic expert skipping saves: MoE-block time with skipping over time without.

    python scripts/bench_skip.py                      # CPU, Mixtral-8x7B-shaped layer, ~3 min on 2 cores
    python scripts/bench_skip.py --device cuda        # the same on a GPU, in bfloat16
    python scripts/bench_skip.py --hidden 1024 --intermediate 3584 --prefill 256   # quicker

Part 1: a one-layer Mixtral with Mixtral-8x7B's expert shapes (hidden 4096,
intermediate 14336, 8 experts, top-2) and random weights. Thresholds: the
paper's median rule, profiled on random inputs of the benchmark's
distribution, so about a quarter of the (token, expert) pairs are skipped
(ideal time ratio 0.75). The MoE block is timed alone, stock (grouped_mm)
against skipping, interleaved, median of --repeats, at a prefill-sized
batch and at decode batches.

Part 2: the bundled model, greedy generation of --new-tokens tokens with and
without skipping (median thresholds profiled on the bundled calib split),
plus held-out perplexity both ways.

Last line: one JSON object with prefill_ratio, decode_ratio (batch 1) and the
rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.calibration.sources import load_documents, parse_sources  # noqa: E402
from moe_sparsify.calibration.tokens import sample_windows, token_stream  # noqa: E402
from moe_sparsify.evaluate import perplexity  # noqa: E402
from moe_sparsify.models import bundled_model_dir, load_model  # noqa: E402
from moe_sparsify.skipping import skip_fractions  # noqa: E402
from moe_sparsify.skipping import skipping as skipping_on  # noqa: E402
from moe_sparsify.thresholds import (  # noqa: E402
    LayerThreshold,
    SkipThresholds,
    model_fingerprint,
    profile,
    routing_weights,
)
from moe_sparsify.timing import timed  # noqa: E402

MEDIAN = {"kind": "quantile", "value": 0.5}


def interleaved(stock, skipping, model, thresholds, device, repeats: int) -> tuple[float, float]:
    """Median seconds of each, alternating so drifts in machine load hit both."""
    times = {"stock": [], "skip": []}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        times["stock"].append(timed(stock, device)[0])
        with skipping_on(model, thresholds):
            times["skip"].append(timed(skipping, device)[0])
    return statistics.median(times["stock"][1:]), statistics.median(times["skip"][1:])


def block_benchmark(args, device, dtype) -> list[dict]:
    config = MixtralConfig(
        vocab_size=32,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    with torch.device(device):
        model = MixtralForCausalLM(config).to(dtype).eval()
    model.set_experts_implementation("grouped_mm")
    adapter = adapter_for(config)
    block = adapter.moe_block(model.model.layers[0])
    for p in block.parameters():
        torch.nn.init.normal_(p, std=args.hidden**-0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    calib = torch.randn(4096, args.hidden, device=device, dtype=dtype, generator=gen)
    with torch.no_grad():
        weights = {0: adapter.route(block, calib)[0].cpu()}
    rule, layers = profile(weights, None, MEDIAN, adapter.top_k)
    thresholds = SkipThresholds(model_fingerprint(model, adapter), rule, MEDIAN, layers)

    rows = []
    # Decode: batches in a row totalling --decode-tokens tokens, so each case sees the usual mix of
    # tokens that skip and tokens that do not (one token alone either skips or not).
    cases = [("prefill", 1, args.prefill)]
    cases += [(f"decode b{b}", max(1, args.decode_tokens // b), b) for b in args.decode]
    for name, steps, tokens in cases:
        xs = torch.randn(steps, 1, tokens, args.hidden, device=device, dtype=dtype, generator=gen)

        def run(xs=xs):
            for x in xs:
                block(x)

        with torch.no_grad():
            stock_s, skip_s = interleaved(run, run, model, thresholds, device, args.repeats)
            with skipping_on(model, thresholds):
                run()
                skipped = skip_fractions(model)[0]
        stock_s, skip_s = stock_s / steps, skip_s / steps
        rows.append(
            {
                "case": name,
                "tokens": tokens,
                "stock_ms": 1e3 * stock_s,
                "skip_ms": 1e3 * skip_s,
                "ratio": skip_s / stock_s,
                "pairs_skipped": skipped,
            }
        )
    del model
    return rows


def generation_benchmark(args, device) -> dict:
    model, tokenizer = load_model(bundled_model_dir("tiny"), torch.float32)
    model.to(device)
    adapter = adapter_for(model.config)
    calib, _ = sample_windows(tokenizer, parse_sources("bundled"), 64, 256, seed=0)
    weights = routing_weights(model, adapter, calib, batch_size=16, device=device)
    rule, layers = profile(weights, None, MEDIAN, adapter.top_k)
    thresholds = SkipThresholds(model_fingerprint(model, adapter), rule, MEDIAN, layers)
    prompt = calib[:1, :32].to(device)

    def generate():
        return model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    zero = SkipThresholds(thresholds.model, rule, MEDIAN, [LayerThreshold(e.layer, 0.0, 0.0) for e in layers])
    with torch.no_grad():
        stock_s, skip_s = interleaved(generate, generate, model, thresholds, device, args.repeats)
        _, dispatch_s = interleaved(generate, generate, model, zero, device, args.repeats)
        heldout = token_stream(tokenizer, load_documents("bundled:heldout"))
        ppl_stock = perplexity(model, heldout, 256, 128, device)["perplexity"]
        with skipping_on(model, thresholds):
            ppl_skip = perplexity(model, heldout, 256, 128, device)["perplexity"]
            skipped = skip_fractions(model)
    return {
        "new_tokens": args.new_tokens,
        "stock_s": stock_s,
        "skip_s": skip_s,
        "ratio": skip_s / stock_s,
        "zero_thresholds_s": dispatch_s,
        "perplexity_stock": ppl_stock,
        "perplexity_skip": ppl_skip,
        "pairs_skipped": sum(skipped.values()) / len(skipped),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--prefill", type=int, default=None, help="tokens in the prefill batch (cpu 512, cuda 8192)")
    ap.add_argument("--decode", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens per decode case, over several batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.prefill = args.prefill or (8192 if device.type == "cuda" else 512)
    torch.manual_seed(0)

    rows = block_benchmark(args, device, dtype)
    print(
        f"MoE block, hidden {args.hidden}, intermediate {args.intermediate}, 8 experts, top-2, {device} "
        f"{str(dtype).removeprefix('torch.')}, median of {args.repeats}, median-rule thresholds",
        file=sys.stderr,
    )
    print(f"{'case':<12} {'tokens':>6} {'stock ms':>9} {'skip ms':>9} {'ratio':>6} {'pairs skipped':>13}")
    for r in rows:
        print(
            f"{r['case']:<12} {r['tokens']:>6} {r['stock_ms']:>9.1f} {r['skip_ms']:>9.1f} {r['ratio']:>6.3f} "
            f"{100 * r['pairs_skipped']:>12.1f}%"
        )
    summary = {
        "device": args.device,
        "prefill_ratio": rows[0]["ratio"],
        "decode_ratio": rows[1]["ratio"],
        "block": rows,
    }
    if not args.skip_generation:
        g = generation_benchmark(args, device)
        print(
            f"bundled model, greedy generation of {g['new_tokens']} tokens: stock {g['stock_s']:.3f} s, "
            f"skipping {g['skip_s']:.3f} s (ratio {g['ratio']:.3f}; with thresholds 0, i.e. the skipping "
            f"dispatch alone, {g['zero_thresholds_s']:.3f} s); held-out perplexity {g['perplexity_stock']:.2f}"
            f" -> {g['perplexity_skip']:.2f} with {100 * g['pairs_skipped']:.1f}% of pairs skipped"
        )
        summary["generation"] = g
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
