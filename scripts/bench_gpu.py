"""The performance record: calibration, exact search, naive search and skipping on one device.

    python scripts/bench_gpu.py                          # CUDA: Mixtral-8x7B-shaped layers, 128 x 2048 tokens
    python scripts/bench_gpu.py --device cpu --tiny      # CPU: small shapes, runs in CI time
    python scripts/bench_gpu.py --out results.json       # also write the full results
    python scripts/bench_gpu.py --calibration-only       # stage 1 only

Runs from the repository root without installing the package, with only
torch, transformers and safetensors. Builds a Mixtral with --layers decoder
layers of the given shape (random weights, bf16 on CUDA, float32 on CPU),
saves it as safetensors and loads it back through moe-sparsify's normal path,
then measures:
  1. calibration: layer-by-layer propagation of samples x seq_len tokens,
     capturing every MoE block's inputs (tokens/s);
  2. exact search per layer: candidate pass + Gram statistics + all subsets,
     keep 6 (28 subsets) and keep 4 (70);
  3. the paper's naive search (one masked forward per subset) on
     --naive-tokens tokens, scaled to all tokens, as a ratio;
  4. skipping: MoE-block time with median-rule thresholds over stock, at a
     prefill batch and at decode batches;
  5. peak memory (CUDA allocator, or process RSS on CPU).
Whole-model figures extrapolate the per-layer times to Mixtral-8x7B's 32 layers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.calibration.propagate import propagate  # noqa: E402
from moe_sparsify.models import bundled_model_dir, load_model  # noqa: E402
from moe_sparsify.objective import SubsetLoss  # noqa: E402
from moe_sparsify.prune import layer_stats  # noqa: E402
from moe_sparsify.search import SearchContext, exhaustive  # noqa: E402
from moe_sparsify.skipping import skip_fractions, skipping  # noqa: E402
from moe_sparsify.thresholds import SkipThresholds, model_fingerprint, profile  # noqa: E402
from moe_sparsify.timing import timed  # noqa: E402

MIXTRAL_LAYERS = 32


def build_checkpoint(args, directory: Path, dtype: torch.dtype) -> float:
    """A random Mixtral saved like a hub checkpoint, with the bundled tokenizer (ids < its 2048 tokens)."""
    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=max(4096, args.seq_len),
        sliding_window=None,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = MixtralForCausalLM(config).to(dtype)
    for name, param in model.named_parameters():
        if "layernorm" not in name and "norm.weight" not in name:
            torch.nn.init.normal_(param, std=args.hidden**-0.5)
    start = time.perf_counter()
    model.save_pretrained(directory)
    seconds = time.perf_counter() - start
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled_model_dir("tiny") / name, directory / name)
    return seconds


def naive_search_s(adapter, block, x, keep: int) -> float:
    n = adapter.num_experts
    reference = adapter.routed_forward(block, x, None)
    for subset in itertools.combinations(range(n), keep):
        mask = torch.zeros(n, dtype=torch.bool, device=x.device)
        mask[list(subset)] = True
        ((adapter.routed_forward(block, x, mask) - reference).float() ** 2).sum().item()
    return 0.0


@torch.no_grad()
def measure_layer(adapter, model, index: int, inputs: list[torch.Tensor], args, device) -> dict:
    """Exact search at keep 6 and 4 on one layer's captured inputs, and the naive keep-4 search."""
    block = adapter.moe_block(model.model.layers[index])
    row = {"layer": index}
    for keep in (6, 4):

        def search(keep=keep):
            oracle = SubsetLoss(layer_stats(adapter, block, inputs, keep))
            return exhaustive(oracle, keep, SearchContext(layer=index))

        row[f"keep{keep}_s"], result = timed(search, device)
        row[f"keep{keep}_kept"] = list(result.kept)
    flat = torch.cat(inputs)
    naive_s, _ = timed(lambda: naive_search_s(adapter, block, flat[: args.naive_tokens], 4), device)
    row["naive_keep4_s_scaled"] = naive_s * len(flat) / args.naive_tokens
    return row


def skip_ratio(model, adapter, block, thresholds, x, device, repeats: int) -> tuple[float, float]:
    stock, skipped = [], []
    with torch.no_grad():
        for round_ in range(repeats + 1):
            s, _ = timed(lambda: block(x), device)
            with skipping(model, thresholds, adapter):
                k, _ = timed(lambda: block(x), device)
                fraction = skip_fractions(model, adapter)[0]
            if round_:
                stock.append(s)
                skipped.append(k)
    return statistics.median(skipped) / statistics.median(stock), fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small shapes and token counts (CPU, CI)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--calibration-only", action="store_true", help="stop after measuring calibration")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        shape = dict(
            hidden=256,
            intermediate=896,
            heads=8,
            kv_heads=2,
            vocab=2048,
            samples=8,
            seq_len=256,
            naive_tokens=512,
            prefill=512,
            batch_size=4,
        )
    else:
        shape = dict(
            hidden=4096,
            intermediate=14336,
            heads=32,
            kv_heads=8,
            vocab=32000,
            samples=128,
            seq_len=2048,
            naive_tokens=8192,
            prefill=8192,
            batch_size=8,
        )
    for key, value in shape.items():
        setattr(args, key, value)
    repeats = 3
    results: dict = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "tokens": args.samples * args.seq_len,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    with tempfile.TemporaryDirectory() as tmp:
        results["save_s"] = build_checkpoint(args, Path(tmp), dtype)
        load_s, (model, _) = timed(lambda: load_model(Path(tmp), dtype), torch.device("cpu"))
        results["load_s"] = load_s
    adapter = adapter_for(model.config)
    tokens = torch.randint(0, 2048, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    captured: dict[int, list[torch.Tensor]] = {}

    def keep_inputs(step):
        captured[step.index] = step.inputs

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        calib_s, _ = timed(
            lambda: propagate(model, adapter, tokens, keep_inputs, batch_size=args.batch_size, device=device), device
        )
    results["calibration_tokens_per_s"] = tokens.numel() / calib_s
    if args.calibration_only:
        print(json.dumps(results))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        return
    model.to(device)

    per_layer = [measure_layer(adapter, model, index, inputs, args, device) for index, inputs in captured.items()]
    with torch.no_grad():
        first = adapter.moe_block(model.model.layers[0])
        calib = torch.cat(captured[0])
        weights = {0: adapter.route(first, calib)[0].cpu()}
        for index in list(captured)[1:]:
            weights[index] = weights[0]  # only layer 0 is timed; the others need a threshold to exist
        rule, layers = profile(weights, None, {"kind": "quantile", "value": 0.5}, adapter.top_k)
        thresholds = SkipThresholds(model_fingerprint(model, adapter), rule, {}, layers)
        skip = {}
        for name, rows in (("prefill", args.prefill), ("decode b1", 1), ("decode b8", 8)):
            x = calib[:rows].unsqueeze(0)
            skip[name] = skip_ratio(model, adapter, first, thresholds, x, device, repeats)
    results["per_layer"] = per_layer
    results["skip"] = {k: {"time_ratio": r, "pairs_skipped": f} for k, (r, f) in skip.items()}
    if device.type == "cuda":
        results["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    keep6 = statistics.mean(r["keep6_s"] for r in per_layer)
    keep4 = statistics.mean(r["keep4_s"] for r in per_layer)
    naive = statistics.mean(r["naive_keep4_s_scaled"] for r in per_layer)
    results["summary"] = {
        "search_keep6_s_per_layer": keep6,
        "search_keep4_s_per_layer": keep4,
        "naive_over_fast_keep4": naive / keep4,
        "whole_model_keep4_s": MIXTRAL_LAYERS
        * (keep4 + args.seq_len * args.samples / results["calibration_tokens_per_s"] / args.layers),
    }
    s = results["summary"]
    print(
        f"{results.get('gpu', args.device)}, {results['dtype']}, {args.layers} layers of hidden {args.hidden} / "
        f"intermediate {args.intermediate}, 8 experts, top-2, {results['tokens']} calibration tokens"
    )
    print(f"{'stage':<36} {'value':>14}")
    print(f"{'load (s)':<36} {results['load_s']:>14.2f}")
    print(f"{'calibration (tokens/s)':<36} {results['calibration_tokens_per_s']:>14.0f}")
    print(f"{'exact search keep 6 (s/layer)':<36} {s['search_keep6_s_per_layer']:>14.3f}")
    print(f"{'exact search keep 4 (s/layer)':<36} {s['search_keep4_s_per_layer']:>14.3f}")
    print(f"{'naive / exact, keep 4':<36} {s['naive_over_fast_keep4']:>14.1f}")
    for name, value in results["skip"].items():
        print(f"{'skip time ratio, ' + name:<36} {value['time_ratio']:>14.3f}")
    peak = results.get("peak_gpu_bytes", results["peak_rss_bytes"])
    print(f"{'peak memory (GiB)':<36} {peak / 2**30:>14.2f}")
    print(f"{'32-layer keep 4, calib + search (s)':<36} {s['whole_model_keep4_s']:>14.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(s))


if __name__ == "__main__":
    main()
