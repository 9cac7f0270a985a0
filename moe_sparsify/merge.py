"""Merge each removed expert into one kept expert, weighted by how often the original layer routes to
each (the M-SMoE / HC-SMoE baseline), before router re-calibration and re-fitting.

Pruning throws the removed experts' weights away. Merging keeps some of what they computed: every
removed expert joins the group of one kept expert, and each kept expert's weights (gate, up, down
and their biases: every tensor of the experts module, stacked by expert) become the average of its
group weighted by routing frequency, the share of calibration tokens whose original top-k holds the
expert. The kept router rows are left as they are.

Which kept expert a removed one joins (`merge_by`):
- "output" (HC-SMoE): the kept expert whose mean output over the calibration tokens is closest
  (Euclidean). It compares what the experts compute, which is what the layer loss sees.
- "router" (M-SMoE): the kept expert whose router logits over the calibration tokens are most
  similar (cosine of the logit columns). Cheaper (no expert runs), but it measures which tokens an
  expert is sent, not what it returns.

Averaging the weights of independently trained experts is not averaging their functions: their
intermediate neurons hold similar features at unrelated positions. With `merge_align` each removed
expert's neurons are first permuted to best match its kept expert's (M-SMoE's and ZipIt!'s alignment,
by activation correlation: `neuron_align.py`); a permutation leaves the expert's function unchanged.
The merge is guarded like the other methods: fitted on the calibration sequences minus the held-back
tail, kept only where the held-back layer loss falls and the fitted tokens' loss does not rise; else
the layer keeps its weights bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import MoEAdapter
from .layer_fit import LayerData, Recovery, RecoveryReport, guarded_report, layer_loss
from .neuron_align import CoActivation, best_permutation, check_alignable, permute_neurons


def check_mergeable(adapter: MoEAdapter, block: nn.Module) -> None:
    """Merging averages stacked expert tensors whose outputs are the standard gated MLP; refuse others."""
    if not adapter.refittable:
        raise ValueError(f"{type(adapter).__name__} computes its experts its own way; merging is not defined")
    if "down_proj" not in adapter.expert_tensors(block):
        raise ValueError(f"{type(adapter).__name__} does not stack its experts' weights; merging is not defined")


@torch.no_grad()
def routing_frequency(adapter: MoEAdapter, block: nn.Module, chunks) -> torch.Tensor:
    """Per expert, the number of tokens whose top-k in the unpruned layer holds it (float64, n)."""
    counts = torch.zeros(adapter.num_experts, dtype=torch.float64)
    for x, _ in chunks:
        _, indices = adapter.route(block, x, None)
        counts += torch.bincount(indices.flatten().cpu(), minlength=adapter.num_experts).double()
    return counts


@torch.no_grad()
def expert_profiles(adapter: MoEAdapter, block: nn.Module, chunks, merge_by: str) -> torch.Tensor:
    """One row per expert to compare experts by: its mean output over every token ("output"), or its
    router-logit column over the tokens, unit length ("router")."""
    if merge_by == "output":
        total = sum(
            torch.stack([adapter.expert_forward(block, x, e).double().sum(0) for e in range(adapter.num_experts)])
            for x, _ in chunks
        )
        return total / sum(len(x) for x, _ in chunks)
    columns = torch.cat([adapter.router_logits(block, x).double() for x, _ in chunks]).T  # n x tokens
    return torch.nn.functional.normalize(columns, dim=1)


def assign_groups(profiles: torch.Tensor, keep: torch.Tensor) -> dict[int, list[int]]:
    """Each kept expert's group: itself, then the removed experts whose profile is closest to its own
    (Euclidean; for unit rows that is the largest cosine). Ties go to the lower expert id."""
    kept = torch.nonzero(keep).flatten().tolist()
    groups = {e: [e] for e in kept}
    for removed in torch.nonzero(~keep).flatten().tolist():
        distances = (profiles[kept] - profiles[removed]).norm(dim=1)
        groups[kept[int(distances.argmin())]].append(removed)
    return groups


@torch.no_grad()
def neuron_correlations(
    adapter: MoEAdapter, block: nn.Module, groups: dict[int, list[int]], chunks
) -> dict[int, torch.Tensor]:
    """For each removed expert, the correlation of its kept expert's intermediate activations with its own
    (kept neurons x removed neurons), on the tokens whose original top-k holds either. A removed expert
    that shares no token with its kept one has no entry."""
    anchors = {removed: kept for kept, members in groups.items() for removed in members[1:]}
    sums: dict[int, CoActivation] = {}
    for x, _ in chunks:
        _, indices = adapter.route(block, x, None)
        for removed, kept in anchors.items():
            tokens = ((indices == kept) | (indices == removed)).any(-1)
            if not tokens.any():
                continue
            a, b = (adapter.expert_hidden(block, x[tokens], e) for e in (kept, removed))
            sums.setdefault(removed, CoActivation(a.shape[-1], a.device)).add(a, b)
    return {removed: s.correlation() for removed, s in sums.items()}


def neuron_permutations(
    adapter: MoEAdapter, block: nn.Module, groups: dict[int, list[int]], chunks
) -> dict[int, torch.Tensor]:
    """For each removed expert, the order of its intermediate neurons that best matches its kept
    expert's (`neuron_correlations`); one with no entry keeps its order."""
    return {r: best_permutation(c) for r, c in neuron_correlations(adapter, block, groups, chunks).items()}


@torch.no_grad()
def merge_groups_(
    adapter: MoEAdapter,
    block: nn.Module,
    groups: dict[int, list[int]],
    frequency: torch.Tensor,
    permutations: dict[int, torch.Tensor] | None = None,
) -> None:
    """In place: each kept expert's tensors become the frequency-weighted average of its group (float64
    sums), each removed member's neurons first reordered by `permutations` where it has one; a group no
    token routed to keeps its kept expert as it is."""
    permutations = permutations or {}
    for name, tensor in adapter.expert_tensors(block).items():
        for target, members in groups.items():
            weights = frequency[members]
            if len(members) == 1 or weights.sum() == 0:
                continue
            stacked = torch.stack(
                [
                    permute_neurons(block.experts, name, tensor.detach()[m], permutations[m])
                    if m in permutations
                    else tensor.detach()[m]
                    for m in members
                ]
            ).double()
            shares = (weights / weights.sum()).to(stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
            tensor[target] = (stacked * shares).sum(0).to(tensor.dtype)


@torch.no_grad()
def merge_removed_experts(
    adapter: MoEAdapter, block: nn.Module, keep: torch.Tensor, data: LayerData, recovery: Recovery
) -> RecoveryReport:
    """Merge the removed experts into the kept ones (statistics from the fitted tokens only), guarded."""
    check_mergeable(adapter, block)
    tensors = adapter.expert_tensors(block)
    if recovery.merge_align:
        check_alignable(block.experts, tensors)
    frequency = routing_frequency(adapter, block, data.fit)
    groups = assign_groups(expert_profiles(adapter, block, data.fit, recovery.merge_by).cpu(), keep)
    permutations = neuron_permutations(adapter, block, groups, data.fit) if recovery.merge_align else None
    kept = torch.nonzero(keep).flatten().to(next(iter(tensors.values())).device)
    originals = {name: t.detach()[kept].clone() for name, t in tensors.items()}

    def losses() -> tuple[float, float]:
        return layer_loss(adapter, block, keep, data.fit), layer_loss(adapter, block, keep, data.held)

    def undo() -> None:
        for name, t in tensors.items():
            t[kept] = originals[name]

    before = losses()
    merge_groups_(adapter, block, groups, frequency, permutations)
    return guarded_report("merge", True, before, losses(), 1, undo)
