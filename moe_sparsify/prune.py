"""From calibration tokens to a plan: per MoE layer, collect statistics, search, decide.

1. Check keep against the model (before any calibration).
2. Layer-wise mode with a stored calibration: read each layer's MoE inputs.
   Otherwise: propagate the tokens layer by layer (progressive mode feeds each
   layer the outputs of the already pruned ones, in the same single pass).
3. For each MoE layer: candidate expert outputs -> Gram statistics -> strategy.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from torch import nn

from . import __version__
from .adapters import MoEAdapter
from .calibration.layer_inputs import LayerInputs, PropagatedInputs, StoredInputs
from .calibration.propagate import LayerStep, Resident
from .calibration.store import CalibrationStore
from .choices import E2E_DEFAULTS
from .config import Settings
from .cost import SearchCost, count_search_cost
from .distributed import ReducedOracle, is_main, world
from .e2e import EndToEndRescorer
from .errors import UsageError, stop_if_asked_after
from .files import dumps, load_mapping, write_atomically
from .guard import EndToEndGuard
from .layer_fit import LayerData, Recovery, block_output
from .objective import LayerStats, SubsetLoss
from .plan import LayerPlan, ModelIdentity, Plan
from .recover import recover_layer
from .routing import group_keep_counts, max_candidate_count
from .search import SearchContext, resolve_strategy, run_strategy


def check_keep(adapter: MoEAdapter, keep: int | None, must_prune: bool = False) -> int:
    """A keep count the model can take. must_prune: it is the user's --keep, where keeping every expert is
    a mistake (a plan's layer may keep all, and the search keeping all is the identity)."""
    n, k = adapter.num_experts, adapter.top_k
    top = n - 1 if must_prune else n
    if top < k:
        raise UsageError(f"each token uses all {n} experts of a layer (top_k={k}): pruning any changes every output")
    if keep is None:
        raise UsageError(f"--keep is required: how many of the {n} experts each MoE layer keeps ({k}..{top})")
    if keep == n and must_prune:
        raise UsageError(f"--keep {keep} keeps all {n} experts per layer, which prunes nothing; choose {k}..{top}")
    if keep > n:
        raise UsageError(f"--keep {keep} is larger than the {n} experts per layer; choose {k}..{top}")
    if keep < k:
        raise UsageError(f"--keep {keep} is smaller than top_k={k} (experts each token uses); choose {k}..{top}")
    spec = adapter.routing
    if (limit := spec.group_limit) is not None and keep not in (allowed := group_keep_counts(n, spec)):
        raise UsageError(
            f"--keep {keep} does not fit group-limited routing ({limit.groups} groups of {n // limit.groups}, "
            f"{limit.chosen} chosen per token): every group keeps the same number of experts so routing "
            f"stays exact; choose a multiple of {limit.groups} from {allowed[0]} to {allowed[-1]}"
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
    sha256, dtype, norms = adapter.router_fingerprint(model, weights=router_weights)
    return ModelIdentity(
        model_type=adapter.config.model_type,
        num_layers=len(adapter.decoder_layers(model)),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        moe_layers=adapter.moe_layers(model),
        router_sha256=sha256,
        router_dtype=dtype,
        router_norms=norms,
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
        "e2e_horizon",
        "e2e_race_z",
        "e2e_logits_layers",
        "batch_size",
        "recover",
        "recover_holdout",
        "recover_merge_by",
        "recover_merge_align",
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


def layer_stats(
    adapter: MoEAdapter,
    block: nn.Module,
    inputs: list[torch.Tensor],
    keep: int,
    offsets: list[torch.Tensor] | None = None,
) -> LayerStats:
    """Gram statistics of one MoE block, exact for every subset of at least `keep` experts.
    offsets: per chunk, target - F(inputs) where the target is not the block's own output on them."""
    device = next(block.parameters()).device
    return LayerStats.collect(
        (x.to(device) for x in inputs),  # lazily: offloaded activations come back one chunk at a time
        lambda x: adapter.router_logits(block, x),
        lambda x, e: adapter.expert_forward(block, x, e),
        adapter.routing,
        adapter.num_experts,
        keep,
        adapter.selection_bias(block),
        offsets=offsets,
    )


def layer_targets(adapter: MoEAdapter, block: nn.Module, step: LayerStep) -> tuple[list[torch.Tensor], list | None]:
    """(what the layer should output on each chunk of its inputs, the offsets from its own output).

    The target is the original layer's output: on the original model's inputs where the step carries
    them (compensating mode: the layer also makes up for the pruned layers before it), else on the
    layer's own inputs (offsets None). Computed before anything in the block changes."""
    device = next(block.parameters()).device

    def full(x: torch.Tensor) -> torch.Tensor:
        return block_output(adapter, block, x.to(device), None)

    if step.original_inputs is None:
        return [full(x) for x in step.inputs], None
    targets = [full(x) for x in step.original_inputs]
    return targets, [t - full(x) for t, x in zip(targets, step.inputs, strict=True)]


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
        stop_if_asked_after(layer.layer)

    def finish(self) -> None:
        if is_main():
            self.path.unlink(missing_ok=True)


@dataclass
class LayerTiming:
    layer: int
    stats_s: float
    search_s: float


class LayerDecider:
    """Decides one MoE layer at a time, whichever source its inputs come from.

    Called with each MoE layer's `LayerStep`; returns the experts to keep (the source may run the
    layer pruned to them before the next one). A layer the journal holds is taken from it (an
    interrupted run resumes); the others get Gram statistics, then the strategy's search, and are
    journaled. Decisions and timings accumulate in layer order.

    compensating: score against the original model's output (the step carries the original inputs).
    recovery: after the decision (resumed ones too: re-fitted weights live only in memory), re-fit the
    kept weights in place (`recover.recover_layer`), each change judged end to end by `guard` on the
    held-back batches; `recovered` collects its per-layer reports.
    """

    def __init__(
        self,
        adapter: MoEAdapter,
        strategy: str,
        keep: int,
        context: SearchContext,
        *,
        journal: ProgressJournal | None = None,
        rescorer: EndToEndRescorer | None = None,
        compensating: bool = False,
        recovery: Recovery | None = None,
        guard: EndToEndGuard | None = None,
        cost: SearchCost | None = None,
    ):
        self.adapter, self.strategy, self.keep, self.context = adapter, strategy, keep, context
        self.journal, self.rescorer = journal, rescorer
        self.compensating, self.recovery, self.guard = compensating, recovery, guard
        self.cost = cost
        self.decisions: list[LayerPlan] = []
        self.timings: list[LayerTiming] = []
        self.recovered: list[dict] = []

    def __call__(self, step: LayerStep) -> list[int]:
        targets, offsets = None, None
        if self.recovery is not None or self.compensating:
            targets, offsets = layer_targets(self.adapter, step.block, step)
        decision, timing = self._resumed(step) or self._searched(step, offsets)
        self.decisions.append(decision)
        self.timings.append(timing)
        if self.recovery is not None:
            self._recover(step, list(decision.kept), targets)
        return list(decision.kept)

    def _recover(self, step: LayerStep, kept: list[int], targets: list[torch.Tensor]) -> None:
        """Re-fit the layer's kept weights in place, each method's change judged by the guard."""
        keep = torch.zeros(self.adapter.num_experts, dtype=torch.bool)
        keep[kept] = True
        data = LayerData.split(list(step.inputs), targets, self.recovery.holdout)
        judge = self.guard.for_layer(step, kept, data.held_batches) if self.guard else None
        reports = recover_layer(self.adapter, step.block, keep, data, self.recovery, judge)
        self.recovered.append({"layer": step.index, "methods": [r.as_dict() for r in reports]})

    def _resumed(self, step: LayerStep) -> tuple[LayerPlan, LayerTiming] | None:
        if self.journal is None or step.index not in self.journal.layers:
            return None
        if self.rescorer is not None:
            self.rescorer.for_layer(step)  # the reference distribution is taken at the first MoE layer
        return self.journal.layers[step.index], LayerTiming(step.index, 0.0, 0.0)

    def _searched(self, step: LayerStep, offsets: list | None) -> tuple[LayerPlan, LayerTiming]:
        start = time.perf_counter()
        stats = layer_stats(self.adapter, step.block, step.inputs, self.keep, offsets)
        if self.cost is not None:
            self.cost.expert_tokens += int((stats.cand_idx < self.adapter.num_experts).sum())
        mid = time.perf_counter()
        scorers = {}
        if self.rescorer is not None and self.context.race_z is not None:
            scorers["race"] = self.rescorer.rounds_for_layer(step)
        elif self.rescorer is not None:
            scorers["rescore"] = self.rescorer.for_layer(step)
        oracle = SubsetLoss(stats)
        result = run_strategy(
            self.strategy,
            ReducedOracle(oracle) if world()[1] > 1 else oracle,
            self.keep,
            replace(self.context, layer=step.index, **scorers),
        )
        timing = LayerTiming(step.index, mid - start, time.perf_counter() - mid)
        decision = LayerPlan(
            layer=step.index,
            kept=list(result.kept),
            loss=result.loss,
            runner_up_loss=result.runner_up_loss,
            subsets_scored=result.subsets_scored,
            divergence=result.divergence,
        )
        if self.journal is not None:
            self.journal.record(decision)
        return decision, timing


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
    cost: SearchCost | None = None,
) -> tuple[Plan, list[LayerTiming]]:
    """token_ids: this process's calibration sequences (with `store`, the stored calibration's).
    residency: how decoder layers reach the device (default: held in memory; `StreamedModel` reads
    them from disk one at a time).
    cost: filled with what the search computed (`cost.SearchCost`: layer, head and expert forwards x
    tokens), counted on the model's own modules (a streamed model's layers are not counted)."""
    residency = residency or Resident(model, adapter)
    keep = check_keep(adapter, settings.keep)
    strategy = resolve_strategy(
        settings.strategy, adapter.num_experts, keep, settings.max_subsets, adapter.routing_groups
    )
    end_to_end = settings.end_to_end(strategy) if strategy in E2E_DEFAULTS else None
    # e2e scores each layer with the earlier ones pruned, against either target.
    mode = settings.mode if end_to_end is None or settings.mode == "compensating" else "progressive"
    decider = _decider(
        model, adapter, settings, strategy, keep, end_to_end, mode, device, residency, journal=journal, cost=cost
    )
    # Recovery's end-to-end guard runs the later layers from each layer's decoder inputs: propagate them.
    stored = store if mode == "layerwise" and decider.recovery is None else None
    inputs = _layer_inputs(model, adapter, settings, token_ids, mode, stored, device, residency, activations, progress)
    with torch.no_grad(), count_search_cost(model, adapter, cost) if cost is not None else nullcontext():
        inputs.walk(decider)

    plan = Plan(
        source=settings.model,
        model=identity or model_identity(model, adapter),
        strategy=strategy,
        mode=mode,
        seed=settings.seed,
        calibration=manifest,
        versions=library_versions(),
        layers=decider.decisions,
        options=_plan_options(adapter, settings, keep, end_to_end, decider.recovery, decider.recovered),
    )
    return plan, decider.timings


def _decider(
    model: nn.Module,
    adapter: MoEAdapter,
    settings: Settings,
    strategy: str,
    keep: int,
    end_to_end: dict | None,
    mode: str,
    device: torch.device,
    residency,
    *,
    journal: ProgressJournal | None,
    cost: SearchCost | None,
) -> LayerDecider:
    """The per-layer decider the settings describe: the strategy's search context, the e2e rescorer
    (e2e strategies), and the recovery with its end-to-end guard (--recover)."""
    recovery = _recovery(settings)
    rescorer = None
    if end_to_end is not None:
        rescorer = EndToEndRescorer(
            model,
            adapter,
            end_to_end["e2e_samples"],
            settings.batch_size,
            device,
            settings.e2e_divergence,
            residency,
            end_to_end["e2e_horizon"],
            end_to_end["e2e_logits_layers"],
        )
    context = SearchContext(
        layer=-1,  # set per layer by the decider
        seed=settings.seed,
        max_subsets=settings.max_subsets,
        beam=settings.beam,
        shortlist=end_to_end["e2e_shortlist"] if end_to_end is not None else 0,
        race_z=end_to_end["e2e_race_z"] if end_to_end is not None else None,
    )
    return LayerDecider(
        adapter,
        strategy,
        keep,
        context,
        journal=journal,
        rescorer=rescorer,
        compensating=mode == "compensating",
        recovery=recovery,
        guard=EndToEndGuard(model, adapter, device, residency) if recovery is not None else None,
        cost=cost,
    )


def _recovery(settings: Settings) -> Recovery | None:
    """What --recover asks for (None: no recovery)."""
    if not settings.recover:
        return None
    return Recovery(
        tuple(settings.recover),
        holdout=settings.recover_holdout,
        merge_by=settings.recover_merge_by,
        merge_align=settings.recover_merge_align,
    )


def _layer_inputs(
    model, adapter, settings: Settings, token_ids, mode: str, store, device, residency, activations, progress
) -> LayerInputs:
    """Where each MoE layer's inputs come from: a stored calibration (read, never re-run) where one is
    given, else the model run now, layer by layer, fed forward as `mode` says."""
    if store is not None:
        return StoredInputs(
            store,
            model,
            adapter,
            seq_len=token_ids.shape[1],
            batch_size=settings.batch_size,
            device=device,
            residency=residency,
            progress=progress,
        )
    return PropagatedInputs(
        model,
        adapter,
        token_ids,
        feed_forward=mode in ("progressive", "compensating"),
        track_original=mode == "compensating",
        batch_size=settings.batch_size,
        device=device,
        residency=residency,
        activations=activations,
        progress=progress,
    )


def _plan_options(
    adapter: MoEAdapter,
    settings: Settings,
    keep: int,
    end_to_end: dict | None,
    recovery: Recovery | None,
    recovered: list[dict],
) -> dict:
    """The search settings a plan records beside its decisions."""
    options = {
        "keep": keep,
        "candidates_per_token": max_candidate_count(adapter.num_experts, adapter.routing, keep),
        "beam": settings.beam,
    }
    if recovery is not None:
        # Re-fitted weights live in the model this run holds; the plan records what changed and the guard's losses.
        options["recover"] = recovery.record(recovered)
    if end_to_end is not None:
        options.update(
            e2e_shortlist=end_to_end["e2e_shortlist"],
            e2e_samples=end_to_end["e2e_samples"],
            e2e_divergence=settings.e2e_divergence,
        )
        # Only where set, so e2e plans made before these settings existed read the same.
        optional = ("e2e_horizon", "e2e_race_z", "e2e_logits_layers")
        options.update({key: end_to_end[key] for key in optional if end_to_end[key] is not None})
    return options
