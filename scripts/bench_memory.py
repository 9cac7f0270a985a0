"""Peak memory of `prune --stream` does not grow with the number of layers.

    python scripts/bench_memory.py              # ~3 min on 2 CPU cores, ~4 GB of disk in a temporary folder
    python scripts/bench_memory.py --fp8        # the same model as an FP8 block-quantized checkpoint
    python scripts/bench_memory.py --fp8 --tiny # hidden 512: a check that it runs

Builds the same-width Mixtral (hidden 1024, intermediate 3584, 8 experts,
float32) with 2 and with 8 decoder layers, saves each as sharded safetensors
(about one layer per shard), prunes each to 6 experts in a fresh process with
`moe-sparsify prune --stream`, and reads the process's peak RSS from its JSON.
With --fp8 every decoder-layer linear but the router is stored as float8_e4m3fn
codes with 128 x 128 float32 block scales (the DeepSeek-V3 layout), so the
search decodes each layer as it is read; the model's decoded size is its
float32 size.
Last line: one JSON object with peak_rss_ratio_8_over_2 (goal <= 1.3),
peak_over_model_size (8-layer peak RSS over its size on disk; goal well under
1) and peak_over_decoded_size (8-layer peak RSS over its float32 size: goal
under 1, so the decoded model is never whole in memory).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moe_sparsify.models import bundled_model_dir  # noqa: E402

BLOCK = 128
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(?!.*(?:norm|\.gate\.)).*\.weight$")  # not norms or the router


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 codes, float32 weight_scale_inv) of a weight whose sides are whole 128-blocks."""
    rows, cols = weight.shape
    tiles = weight.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    codes = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return codes, scale


def to_fp8(directory: Path) -> None:
    """Rewrite a saved float checkpoint in place as FP8 block-quantized, shard by shard."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, tensor in load_file(directory / shard).items():
            if QUANTIZED.match(name):
                tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = quantize_blocks(tensor)
            else:
                tensors[name] = tensor
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK], "fmt": "e4m3"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def build(directory: Path, layers: int, hidden: int, intermediate: int) -> int:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
    )
    model = MixtralForCausalLM(config)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    model.save_pretrained(directory, max_shard_size=int(layer_bytes * 1.05))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled_model_dir("tiny") / name, directory / name)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def peak_rss(model_dir: Path, output: Path) -> int:
    command = [
        sys.executable,
        "-m",
        "moe_sparsify",
        "prune",
        "--model",
        str(model_dir),
        "--keep",
        "6",
        "--stream",
        "--samples",
        "16",
        "--seq-len",
        "256",
        "--device",
        "cpu",
        "--output",
        str(output),
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout)["peak_memory"]["cpu_rss_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp8", action="store_true", help="store the model FP8 block-quantized")
    parser.add_argument("--tiny", action="store_true", help="hidden 512, intermediate 1024: a quick check")
    args = parser.parse_args()
    hidden, intermediate = (512, 1024) if args.tiny else (1024, 3584)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for layers in (2, 8):
            model_dir = Path(tmp) / f"model{layers}"
            decoded = build(model_dir, layers, hidden, intermediate)
            if args.fp8:
                to_fp8(model_dir)
            size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
            peak = peak_rss(model_dir, Path(tmp) / f"out{layers}")
            results[layers] = {"model_bytes": size, "decoded_bytes": decoded, "peak_rss_bytes": peak}
            shutil.rmtree(model_dir)
    print(f"{'layers':>6} {'model on disk GiB':>18} {'decoded GiB':>12} {'peak RSS GiB':>13}")
    for layers, r in results.items():
        sizes = (r["model_bytes"], r["decoded_bytes"], r["peak_rss_bytes"])
        print(f"{layers:>6} {sizes[0] / 2**30:>18.2f} {sizes[1] / 2**30:>12.2f} {sizes[2] / 2**30:>13.2f}")
    summary = {
        "format": "fp8" if args.fp8 else "float32",
        "peak_rss_ratio_8_over_2": results[8]["peak_rss_bytes"] / results[2]["peak_rss_bytes"],
        "peak_over_model_size": results[8]["peak_rss_bytes"] / results[8]["model_bytes"],
        "peak_over_decoded_size": results[8]["peak_rss_bytes"] / results[8]["decoded_bytes"],
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
