"""Time and memory of `--recover router` and `--recover refit` on one Mixtral-8x7B-shaped MoE block.

    python scripts/bench_recover.py                      # CUDA: hidden 4096, intermediate 14336, 65,536 tokens
    python scripts/bench_recover.py --device cpu --tiny  # CPU: small shapes, seconds

One Mixtral MoE block with random weights (bf16 on CUDA, float32 on CPU) and random inputs; the
target is the full block's output (the layerwise target), the kept set is experts 0..keep-1.
Each method runs alone on a fresh copy of the block, through `recover.recover_layer` as `prune
--recover` calls it, and reports its seconds, peak memory (CUDA allocator, or process RSS on CPU)
and whether its guard accepted the change. Refit's cost grows linearly with the tokens routed to
each expert (the H accumulation) plus one intermediate x intermediate float64 solve per expert.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.layer_fit import LayerData, Recovery  # noqa: E402
from moe_sparsify.recover import recover_layer  # noqa: E402


def block_and_adapter(args, device, dtype):
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    with torch.device("cpu"):
        model = MixtralForCausalLM(config)
    adapter = adapter_for(model.config)
    block = adapter.moe_block(model.model.layers[0])
    for param in block.parameters():
        torch.nn.init.normal_(param, std=args.hidden**-0.5, generator=torch.Generator().manual_seed(0))
    return adapter, block.to(device=device, dtype=dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="hidden 256 / intermediate 896, 4,096 tokens")
    ap.add_argument("--tokens", type=int, help="calibration tokens (default 65,536; 4,096 with --tiny)")
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.hidden, args.intermediate = (256, 896) if args.tiny else (4096, 14336)
    args.tokens = args.tokens or (4096 if args.tiny else 65536)
    seq_len = 512 if args.tiny else 2048
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapter, block = block_and_adapter(args, device, dtype)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        y = torch.cat([adapter.routed_forward(block, part, None) for part in x.split(8192)])
    keep = torch.zeros(8, dtype=torch.bool)
    keep[: args.keep] = True
    # One chunk per calibration sequence, as prune hands recovery its batches; the last 1/8 held back.
    data = LayerData.split(list(x.split(seq_len)), list(y.split(seq_len)), holdout=0.125)
    results = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "tokens": args.tokens,
        "keep": args.keep,
        "methods": {},
    }
    for method in ("router", "refit"):
        trial = copy.deepcopy(block)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        (report,) = recover_layer(adapter, trial, keep, data, Recovery((method,)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = (
            torch.cuda.max_memory_allocated(device) - base
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        results["methods"][method] = {"seconds": seconds, "peak_bytes_above_inputs": peak, **report.as_dict()}
        del trial
        print(
            f"{method:<7} {seconds:8.2f} s  peak {peak / 2**30:6.2f} GiB  accepted {report.accepted}  "
            f"fit {report.fit_before:.4g} -> {report.fit_after:.4g}  held {report.held_before:.4g} -> "
            f"{report.held_after:.4g}  steps {report.steps}"
        )
    print(json.dumps({m: round(r["seconds"], 3) for m, r in results["methods"].items()}))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
