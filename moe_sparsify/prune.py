"""From calibration tokens to a plan: per MoE layer, collect statistics, search, decide.

1. Check keep against the model (before any calibration).
2. Layer-wise mode with a stored calibration: read each layer's MoE inputs.
   Otherwise: propagate the tokens layer by layer (progressive mode feeds each
   layer the outputs of the already pruned ones, in the same single pass).
3. For each MoE layer: candidate expert outputs -> Gram statistics -> strategy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from . import __version__
from .adapters import MoEAdapter
from .calibration.propagate import propagate
from .calibration.store import CalibrationStore
from .config import Settings
from .errors import UsageError
from .objective import LayerStats, SubsetLoss
from .plan import LayerPlan, ModelIdentity, Plan
from .routing import candidate_count
from .search import SearchContext, run_strategy


def check_keep(adapter: MoEAdapter, keep: int | None) -> int:
    n, k = adapter.num_experts, adapter.top_k
    if keep is None:
        raise UsageError(f"--keep is required: how many of the {n} experts each MoE layer keeps ({k}..{n})")
    if keep > n:
        raise UsageError(f"--keep {keep} is larger than the {n} experts per layer; choose {k}..{n}")
    if keep < k:
        raise UsageError(f"--keep {keep} is smaller than top_k={k} (experts each token uses); choose {k}..{n}")
    return keep


def model_identity(model: nn.Module, adapter: MoEAdapter) -> ModelIdentity:
    return ModelIdentity(
        model_type=adapter.config.model_type,
        num_layers=len(adapter.decoder_layers(model)),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        moe_layers=adapter.moe_layers(model),
        router_sha256=adapter.router_fingerprint(model),
    )


def library_versions() -> dict:
    return {
        "moe_sparsify": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def layer_stats(adapter: MoEAdapter, block: nn.Module, inputs: list[torch.Tensor], keep: int) -> LayerStats:
    """Gram statistics of one MoE block, exact for every subset of at least `keep` experts."""
    return LayerStats.collect(
        inputs,
        lambda x: adapter.router_logits(block, x),
        lambda x, e: adapter.expert_forward(block, x, e),
        adapter.routing,
        adapter.num_experts,
        candidate_count(adapter.num_experts, adapter.top_k, keep),
    )


@dataclass
class LayerTiming:
    layer: int
    stats_s: float
    search_s: float


def _chunks(x: torch.Tensor, rows: int) -> list[torch.Tensor]:
    return list(x.split(rows))


def plan_pruning(
    model: nn.Module,
    adapter: MoEAdapter,
    settings: Settings,
    token_ids: torch.Tensor,
    manifest: dict,
    *,
    device: torch.device,
    store: CalibrationStore | None = None,
    progress=None,
) -> tuple[Plan, list[LayerTiming]]:
    keep = check_keep(adapter, settings.keep)
    layers_out: list[LayerPlan] = []
    timings: list[LayerTiming] = []

    def decide(index: int, block: nn.Module, inputs: list[torch.Tensor]) -> list[int]:
        start = time.perf_counter()
        stats = layer_stats(adapter, block, inputs, keep)
        mid = time.perf_counter()
        ctx = SearchContext(layer=index, seed=settings.seed, max_subsets=settings.max_subsets, beam=settings.beam)
        result = run_strategy(settings.strategy, SubsetLoss(stats), keep, ctx)
        timings.append(LayerTiming(index, mid - start, time.perf_counter() - mid))
        layers_out.append(
            LayerPlan(
                layer=index,
                kept=list(result.kept),
                loss=result.loss,
                runner_up_loss=result.runner_up_loss,
                subsets_scored=result.subsets_scored,
            )
        )
        return list(result.kept)

    with torch.no_grad():
        if store is not None and settings.mode == "layerwise":
            layers = adapter.decoder_layers(model)
            task = progress.add_task("layers", total=len(layers)) if progress else None
            for index in adapter.moe_layers(model):
                home = next(layers[index].parameters()).device
                layer = layers[index].to(device)
                inputs = store.layer_inputs(index).to(device=device, dtype=next(layer.parameters()).dtype)
                decide(index, adapter.moe_block(layer), _chunks(inputs, settings.batch_size * settings.seq_len))
                layer.to(home)
                if progress:
                    progress.advance(task)
        else:
            progressive = settings.mode == "progressive"

            def on_layer(step):
                kept = decide(step.index, step.block, step.inputs)
                return kept if progressive else None

            propagate(
                model, adapter, token_ids, on_layer, batch_size=settings.batch_size, device=device, progress=progress
            )

    plan = Plan(
        source=settings.model,
        model=model_identity(model, adapter),
        strategy=settings.strategy,
        mode=settings.mode,
        seed=settings.seed,
        calibration=manifest,
        versions=library_versions(),
        layers=layers_out,
        options={
            "keep": keep,
            "candidates_per_token": candidate_count(adapter.num_experts, adapter.top_k, keep),
            "beam": settings.beam,
        },
    )
    return plan, timings
