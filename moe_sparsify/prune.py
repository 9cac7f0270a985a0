"""From calibration tokens to a plan: per MoE layer, collect statistics, search, decide.

1. Check keep against the model (before any calibration).
2. Layer-wise mode with a stored calibration: read each layer's MoE inputs.
   Otherwise: propagate the tokens layer by layer (progressive mode feeds each
   layer the outputs of the already pruned ones, in the same single pass).
3. For each MoE layer: candidate expert outputs -> Gram statistics -> strategy.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from . import __version__
from .adapters import MoEAdapter
from .calibration.propagate import Resident, propagate, run_layer
from .calibration.store import CalibrationStore
from .config import Settings
from .distributed import ReducedOracle, is_main, reduce_means, world
from .errors import FailedRun, UsageError
from .evaluate import mean_kl_of
from .files import dumps, load_mapping, write_atomically
from .objective import LayerStats, SubsetLoss
from .plan import LayerPlan, ModelIdentity, Plan
from .routing import group_keep_counts, max_candidate_count
from .search import Rescorer, SearchContext, resolve_strategy, run_strategy


def check_keep(adapter: MoEAdapter, keep: int | None) -> int:
    n, k = adapter.num_experts, adapter.top_k
    if keep is None:
        raise UsageError(f"--keep is required: how many of the {n} experts each MoE layer keeps ({k}..{n})")
    if keep > n:
        raise UsageError(f"--keep {keep} is larger than the {n} experts per layer; choose {k}..{n}")
    if keep < k:
        raise UsageError(f"--keep {keep} is smaller than top_k={k} (experts each token uses); choose {k}..{n}")
    spec = adapter.routing
    if spec.grouped and keep not in (allowed := group_keep_counts(n, spec)):
        raise UsageError(
            f"--keep {keep} does not fit group-limited routing ({spec.groups} groups of {n // spec.groups}, "
            f"{spec.groups_chosen} chosen per token): every group keeps the same number of experts so routing "
            f"stays exact; choose a multiple of {spec.groups} from {allowed[0]} to {allowed[-1]}"
        )
    return keep


def check_kept(adapter: MoEAdapter, kept: list[int]) -> None:
    """A plan's kept set is one the model can take: a valid count, an equal share per routing group."""
    check_keep(adapter, len(kept))
    groups = adapter.routing_groups
    if groups > 1:
        size = adapter.num_experts // groups
        shares = [sum(1 for e in kept if e // size == g) for g in range(groups)]
        if len(set(shares)) > 1:
            raise UsageError(
                f"the plan keeps {shares} experts from the {groups} routing groups; group-limited routing needs "
                "the same number from each: make the plan with moe-sparsify prune"
            )


def model_identity(model: nn.Module, adapter: MoEAdapter, router_weights: dict | None = None) -> ModelIdentity:
    return ModelIdentity(
        model_type=adapter.config.model_type,
        num_layers=len(adapter.decoder_layers(model)),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        moe_layers=adapter.moe_layers(model),
        router_sha256=adapter.router_fingerprint(model, weights=router_weights),
    )


def search_fingerprint(settings: Settings, manifest: dict, identity: ModelIdentity) -> dict:
    """Everything a plan's decisions depend on, for resuming safely."""
    keys = (
        "keep",
        "strategy",
        "mode",
        "seed",
        "max_subsets",
        "beam",
        "e2e_shortlist",
        "e2e_samples",
        "e2e_divergence",
        "batch_size",
    )
    return {
        "settings": {k: getattr(settings, k) for k in keys},
        "calibration": manifest.get("sha256"),
        "model": asdict(identity),
    }


def library_versions() -> dict:
    return {
        "moe_sparsify": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def layer_stats(adapter: MoEAdapter, block: nn.Module, inputs: list[torch.Tensor], keep: int) -> LayerStats:
    """Gram statistics of one MoE block, exact for every subset of at least `keep` experts."""
    device = next(block.parameters()).device
    return LayerStats.collect(
        (x.to(device) for x in inputs),  # lazily: offloaded activations come back one chunk at a time
        lambda x: adapter.router_logits(block, x),
        lambda x, e: adapter.expert_forward(block, x, e),
        adapter.routing,
        adapter.num_experts,
        keep,
        adapter.selection_bias(block),
    )


class ProgressJournal:
    """Per-layer decisions written atomically as prune goes, so an interrupted run resumes.

    The journal carries a fingerprint of everything the decisions depend on (search settings,
    calibration manifest, model identity); a rerun with other arguments or another model refuses to
    resume rather than mixing decisions. Test hook: MOE_SPARSIFY_STOP_AFTER_LAYER=k stops the run
    right after layer k is recorded.
    """

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint = Path(path), fingerprint
        self.layers: dict[int, LayerPlan] = {}
        if self.path.exists():
            data = load_mapping(self.path, "progress file", "delete it to start over")
            if data.get("fingerprint") != fingerprint:
                raise UsageError(
                    f"{self.path} was left by an interrupted run with other settings or another model; rerun "
                    "with the same arguments to resume, or delete it to start over"
                )
            self.layers = {lp["layer"]: LayerPlan(**lp) for lp in data["layers"]}

    def record(self, layer: LayerPlan) -> None:
        self.layers[layer.layer] = layer
        if is_main():  # every rank holds the same decisions; one writes them
            data = {"fingerprint": self.fingerprint, "layers": [asdict(lp) for lp in self.layers.values()]}
            write_atomically(self.path, dumps(data, "json"))
        stop = os.environ.get("MOE_SPARSIFY_STOP_AFTER_LAYER")
        if stop is not None and int(stop) == layer.layer:
            raise FailedRun(f"stopped after layer {layer.layer} (MOE_SPARSIFY_STOP_AFTER_LAYER); rerun to resume")

    def finish(self) -> None:
        if is_main():
            self.path.unlink(missing_ok=True)


@dataclass
class LayerTiming:
    layer: int
    stats_s: float
    search_s: float


class EndToEndRescorer:
    """KL(original || pruned) of next-token distributions, for the e2e strategy.

    Runs on cached activations: at MoE layer l it takes the decoder-layer inputs of the first
    `samples` calibration sequences (whole batches), already produced by the pruned layers before l,
    and runs layers l..end, the final norm and the head, with layer l pruned to each candidate
    subset and the later layers as they are. The reference distribution is taken once, at the first
    MoE layer, before anything is pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        samples: int,
        batch_size: int,
        device: torch.device,
        divergence: str = "kl",
        residency=None,
    ):
        self.model, self.adapter, self.device, self.divergence = model, adapter, device, divergence
        self.residency = residency or Resident(model, adapter)
        # Under torchrun each rank holds every world-th sequence: its first samples/world of them make up
        # the same first `samples` sequences a single process would score.
        per_rank = -(-samples // world()[1])
        self.batches = -(-per_rank // batch_size)
        self.reference: list[torch.Tensor] | None = None

    def _log_probs(self, step, start: int) -> list[torch.Tensor]:
        """Layers start..end over the cached batches; the later layers visit the device one at a time."""
        layers = self.adapter.decoder_layers(self.model)
        # Each pass gets its own copies of the layer kwargs: outputs a layer hands to the next one differ
        # between the subsets being scored.
        batches = [(hidden, [dict(kw) for kw in kwargs]) for hidden, kwargs in step.batches[: self.batches]]
        states = [hidden.to(self.device) for hidden, _ in batches]
        for index in range(start, len(layers)):
            layer = layers[index] if index == start else self.residency.load_layer(index, self.device)
            states = [run_layer(layer, h, kwargs, index, self.adapter) for h, (_, kwargs) in zip(states, batches)]
            if index != start:
                self.residency.release_layer(index)
        return [torch.log_softmax(self.adapter.final_logits(self.model, h).float(), dim=-1) for h in states]

    def for_layer(self, step) -> Rescorer:
        if self.reference is None:
            self.reference = self._log_probs(step, step.index)

        def rescore(subsets: list[tuple[int, ...]]) -> list[float]:
            divergences = []
            for subset in subsets:
                with self.adapter.pruned_view(self.model, {step.index: list(subset)}):
                    pruned = self._log_probs(step, step.index)
                divergences.append(mean_kl_of(self.reference, pruned, self.divergence))
            # Under torchrun each rank scored its own sequences: weight their means by token counts.
            return reduce_means(divergences, sum(ref[..., 0].numel() for ref in self.reference))

        return rescore


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
    journal: ProgressJournal | None = None,
    residency=None,
    identity: ModelIdentity | None = None,
    activations=None,
) -> tuple[Plan, list[LayerTiming]]:
    """residency: how decoder layers reach the device (default: held in memory; `StreamedModel` reads
    them from disk one at a time)."""
    residency = residency or Resident(model, adapter)
    keep = check_keep(adapter, settings.keep)
    strategy = resolve_strategy(
        settings.strategy, adapter.num_experts, keep, settings.max_subsets, adapter.routing_groups
    )
    layers_out: list[LayerPlan] = []
    timings: list[LayerTiming] = []

    end_to_end = strategy == "e2e"
    rescorer = None
    if end_to_end:
        rescorer = EndToEndRescorer(
            model, adapter, settings.e2e_samples, settings.batch_size, device, settings.e2e_divergence, residency
        )
    mode = "progressive" if end_to_end else settings.mode  # e2e scores each layer with the earlier ones pruned

    def decide(index: int, block: nn.Module, inputs: list[torch.Tensor], step=None) -> list[int]:
        if journal is not None and index in journal.layers:  # finished before an interruption
            if rescorer is not None:
                rescorer.for_layer(step)  # the reference distribution is taken at the first MoE layer
            layers_out.append(journal.layers[index])
            timings.append(LayerTiming(index, 0.0, 0.0))
            return list(journal.layers[index].kept)
        start = time.perf_counter()
        stats = layer_stats(adapter, block, inputs, keep)
        mid = time.perf_counter()
        ctx = SearchContext(
            layer=index,
            seed=settings.seed,
            max_subsets=settings.max_subsets,
            beam=settings.beam,
            shortlist=settings.e2e_shortlist,
            rescore=rescorer.for_layer(step) if rescorer else None,
        )
        oracle = SubsetLoss(stats)
        result = run_strategy(strategy, ReducedOracle(oracle) if world()[1] > 1 else oracle, keep, ctx)
        timings.append(LayerTiming(index, mid - start, time.perf_counter() - mid))
        decision = LayerPlan(
            layer=index,
            kept=list(result.kept),
            loss=result.loss,
            runner_up_loss=result.runner_up_loss,
            subsets_scored=result.subsets_scored,
            divergence=result.divergence,
        )
        layers_out.append(decision)
        if journal is not None:
            journal.record(decision)
        return decision.kept

    with torch.no_grad():
        if store is not None and mode == "layerwise":
            layers = adapter.decoder_layers(model)
            task = progress.add_task("layers", total=len(layers)) if progress else None
            for index in adapter.moe_layers(model):
                layer = residency.load_layer(index, device)
                stored = store.layer_inputs(index)
                rank, size = world()  # this rank's share of the sequences, as with sampled tokens
                stored = stored.view(-1, settings.seq_len, stored.shape[-1])[rank::size].reshape(-1, stored.shape[-1])
                inputs = stored.to(device=device, dtype=next(layer.parameters()).dtype)
                decide(index, adapter.moe_block(layer), list(inputs.split(settings.batch_size * settings.seq_len)))
                residency.release_layer(index)
                if progress:
                    progress.advance(task)
        else:
            progressive = mode == "progressive"

            def on_layer(step):
                kept = decide(step.index, step.block, step.inputs, step)
                return kept if progressive else None

            propagate(
                model,
                adapter,
                token_ids,
                on_layer,
                batch_size=settings.batch_size,
                device=device,
                progress=progress,
                residency=residency,
                activations=activations,
            )

    plan = Plan(
        source=settings.model,
        model=identity or model_identity(model, adapter),
        strategy=strategy,
        mode=mode,
        seed=settings.seed,
        calibration=manifest,
        versions=library_versions(),
        layers=layers_out,
        options={
            "keep": keep,
            "candidates_per_token": max_candidate_count(adapter.num_experts, adapter.routing, keep),
            "beam": settings.beam,
            **(
                {
                    "e2e_shortlist": settings.e2e_shortlist,
                    "e2e_samples": settings.e2e_samples,
                    "e2e_divergence": settings.e2e_divergence,
                }
                if end_to_end
                else {}
            ),
        },
    )
    return plan, timings
