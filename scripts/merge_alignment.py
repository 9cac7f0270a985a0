"""How far neuron alignment brings `--recover merge`, layer by layer, before any guard decides.

    python scripts/merge_alignment.py                                  # the bundled model, 128 x 256 tokens
    python scripts/merge_alignment.py --model DIR --calibration calib.txt
    python scripts/merge_alignment.py --samples 8 --seq-len 64 --keep 4  # a tiny run

For each keep, the exhaustive layer-wise search chooses the kept experts; then, in every MoE layer, on the
original model's inputs and outputs over the calibration tokens the merge is fitted on (the last 12.5 %
of batches held back, as prune does), it prints:
- the fitted tokens' layer loss after merging, over the loss of the pruned layer without merging, with
  plain averaging and with aligned averaging (below 1: the merge helps the layer; the guard needs that);
- the mean correlation of the neurons averaged together: position by position (plain) and as aligned.
The last line of stdout is a JSON summary, the mean of each over layers, per keep.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.adapters import adapter_for  # noqa: E402
from moe_sparsify.calibration.sources import parse_sources  # noqa: E402
from moe_sparsify.calibration.tokens import sample_windows  # noqa: E402
from moe_sparsify.config import Settings  # noqa: E402
from moe_sparsify.layer_fit import LayerData, Recovery, layer_loss  # noqa: E402
from moe_sparsify.merge import (  # noqa: E402
    assign_groups,
    expert_profiles,
    merge_groups_,
    neuron_correlations,
    routing_frequency,
)
from moe_sparsify.models import load_model, resolve_model_dir  # noqa: E402
from moe_sparsify.neuron_align import best_permutation  # noqa: E402
from moe_sparsify.prune import plan_pruning  # noqa: E402


@torch.no_grad()
def layer_streams(model, adapter, tokens: torch.Tensor, batch_size: int) -> dict[int, tuple[list, list]]:
    """Per MoE layer, its inputs and outputs in the original model, one (rows x hidden) chunk per batch."""
    layers = adapter.decoder_layers(model)
    streams = {index: ([], []) for index in adapter.moe_layers(model)}

    def recorder(index):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            streams[index][0].append(inputs[0].reshape(-1, inputs[0].shape[-1]))
            streams[index][1].append(out.reshape(-1, out.shape[-1]))

        return hook

    hooks = [adapter.moe_block(layers[i]).register_forward_hook(recorder(i)) for i in streams]
    try:
        for batch in tokens.split(batch_size):
            model(input_ids=batch)
    finally:
        for hook in hooks:
            hook.remove()
    return streams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="alias or model directory (default: the bundled model)")
    ap.add_argument("--calibration", default="bundled", help="calibration source, as prune --calibration")
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(resolve_model_dir(args.model), torch.float32)
    adapter = adapter_for(model.config)
    tokens, manifest = sample_windows(tokenizer, parse_sources(args.calibration), args.samples, args.seq_len, seed=0)
    batch_size = min(16, max(args.samples // 2, 1))  # prune's batches; at least two, to hold one back
    streams = layer_streams(model, adapter, tokens, batch_size)
    layers = adapter.decoder_layers(model)
    summary = {}
    print(f"{'keep':>4} {'layer':>5} {'plain loss':>10} {'aligned loss':>12} {'plain corr':>10} {'aligned corr':>12}")
    for keep_count in args.keep:
        settings = Settings(
            model=args.model, keep=keep_count, strategy="exhaustive", batch_size=batch_size, seq_len=args.seq_len
        )
        plan, _ = plan_pruning(model, adapter, settings, tokens, manifest, device=torch.device("cpu"))
        rows = []
        for index, kept in plan.kept().items():
            keep = torch.zeros(adapter.num_experts, dtype=torch.bool)
            keep[kept] = True
            data = LayerData.split(*streams[index], Recovery(("merge",)).holdout)
            block = adapter.moe_block(layers[index])
            unmerged = layer_loss(adapter, block, keep, data.fit)
            frequency = routing_frequency(adapter, block, data.fit)
            groups = assign_groups(expert_profiles(adapter, block, data.fit, "output").cpu(), keep)
            correlations = neuron_correlations(adapter, block, groups, data.fit)
            permutations = {removed: best_permutation(c) for removed, c in correlations.items()}
            row = {
                "plain_corr": _mean(c.diagonal().mean().item() for c in correlations.values()),
                "aligned_corr": _mean(
                    c[torch.arange(len(c)), permutations[r]].mean().item() for r, c in correlations.items()
                ),
            }
            for name, order in (("plain_loss", None), ("aligned_loss", permutations)):
                merged = copy.deepcopy(block)
                merge_groups_(adapter, merged, groups, frequency, order)
                row[name] = layer_loss(adapter, merged, keep, data.fit) / unmerged
            rows.append(row)
            print(
                f"{keep_count:>4} {index:>5} {row['plain_loss']:>10.3f} {row['aligned_loss']:>12.3f} "
                f"{row['plain_corr']:>10.3f} {row['aligned_corr']:>12.3f}"
            )
        summary[f"keep{keep_count}"] = {key: _mean(r[key] for r in rows) for key in rows[0]}
    print(json.dumps(summary))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
