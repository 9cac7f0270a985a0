"""Peak memory of `prune --stream` does not grow with the number of layers.

    python scripts/bench_memory.py          # ~3 min on 2 CPU cores, ~4 GB of disk in a temporary folder

Builds the same-width Mixtral (hidden 1024, intermediate 3584, 8 experts,
float32) with 2 and with 8 decoder layers, saves each as sharded safetensors
(about one layer per shard), prunes each to 6 experts in a fresh process with
`moe-sparsify prune --stream`, and reads the process's peak RSS from its JSON.
Last line: one JSON object with peak_rss_ratio_8_over_2 (goal <= 1.3) and
peak_over_model_size (8-layer peak RSS over its size on disk; goal well under 1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moe_sparsify.models import bundled_model_dir  # noqa: E402


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
    hidden, intermediate = 1024, 3584
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for layers in (2, 8):
            model_dir = Path(tmp) / f"model{layers}"
            size = build(model_dir, layers, hidden, intermediate)
            results[layers] = {"model_bytes": size, "peak_rss_bytes": peak_rss(model_dir, Path(tmp) / f"out{layers}")}
            shutil.rmtree(model_dir)
    print(f"{'layers':>6} {'model on disk GiB':>18} {'peak RSS GiB':>13}")
    for layers, r in results.items():
        print(f"{layers:>6} {r['model_bytes'] / 2**30:>18.2f} {r['peak_rss_bytes'] / 2**30:>13.2f}")
    summary = {
        "peak_rss_ratio_8_over_2": results[8]["peak_rss_bytes"] / results[2]["peak_rss_bytes"],
        "peak_over_model_size": results[8]["peak_rss_bytes"] / results[8]["model_bytes"],
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
