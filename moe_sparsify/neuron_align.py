"""Neuron alignment before merging experts (the step M-SMoE and ZipIt! take before averaging).

An expert is act(gate x) * (up x) followed by a down projection. Its intermediate neurons can be
listed in any order: permuting the rows of gate and up and the columns of down together leaves the
expert's function unchanged. Two experts trained apart hold similar features at unrelated positions,
so averaging their weights position by position averages unrelated neurons. Aligning first puts each
of the removed expert's neurons at the position of the kept expert's neuron it behaves most like.

"Behaves like" is measured on activations, not weights: the Pearson correlation over calibration
tokens of the intermediate activations act(gate x) * (up x) of the two experts, on the tokens whose
original top-k holds either of them (the inputs the merged expert will serve). Activations see what a
neuron computes on real inputs whatever its scale; weight similarity compares gate, up and down
vectors that can differ in sign and scale for one and the same feature. The cost is one extra pass of
the two experts' gate and up projections over those tokens, less than the output profiles the merge
already computes. The assignment maximising the summed correlation is solved exactly (Hungarian
method, scipy.optimize.linear_sum_assignment).

Where the neurons lie in each stacked expert tensor is read from the flags transformers 5.x sets on
every experts module (`use_experts_implementation`): `is_transposed` (GPT-OSS, Aria: hidden first),
and `is_concatenated` (gate_up_proj holds [gate; up], else gate and up interleaved, GPT-OSS). A tensor
this module does not know (an ungated up_proj: no family that merging supports has one) is refused,
never guessed. It also takes each family's gate (`_apply_gate`) to act neuron by neuron, as every
one merging supports does (SwiGLU, GPT-OSS's and MiniMax-M3's clamped variants): the tests check the
permuted block through its stock forward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Stacked expert tensors along whose intermediate axis neurons lie: name -> (axis in one expert's
# tensor, untransposed; axis when transposed, or None: the tensor has no intermediate axis).
_NEURON_AXES = {
    "gate_up_proj": (0, 1),
    "gate_up_proj_bias": (0, 0),
    "down_proj": (1, 0),
    "down_proj_bias": (None, None),
}


def check_alignable(experts: nn.Module, names) -> None:
    """Refuse an experts module with a tensor whose neuron layout is not known here."""
    unknown = sorted(set(names) - set(_NEURON_AXES))
    if unknown:
        raise ValueError(
            f"{type(experts).__name__} holds expert tensors {unknown} whose neuron layout is unknown; "
            "neuron alignment is not defined for it (set recover_merge_align: false)"
        )


def permute_neurons(experts: nn.Module, name: str, value: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """One expert's tensor `name` (its slice of the stacked parameter) with its intermediate neurons
    reordered: neuron i of the result is neuron permutation[i] of `value`."""
    check_alignable(experts, [name])
    transposed = bool(getattr(experts, "is_transposed", False))
    axis = _NEURON_AXES[name][1 if transposed else 0]
    if axis is None:
        return value
    index = permutation.to(value.device)
    if name.startswith("gate_up_proj"):  # 2 x intermediate entries along the axis: gate and up
        size = value.shape[axis] // 2
        if getattr(experts, "is_concatenated", True):
            index = torch.cat([index, index + size])
        else:
            index = torch.stack([2 * index, 2 * index + 1], dim=1).flatten()
    return value.index_select(axis, index)


class CoActivation:
    """Running sums, over tokens, that give the Pearson correlation of two experts' intermediate
    activations (float64: sums over many tokens)."""

    def __init__(self, width: int, device: torch.device):
        self.tokens = 0
        zeros = {"dtype": torch.float64, "device": device}
        self.sum_a, self.sum_b = torch.zeros(width, **zeros), torch.zeros(width, **zeros)
        self.sq_a, self.sq_b = torch.zeros(width, **zeros), torch.zeros(width, **zeros)
        self.cross = torch.zeros(width, width, **zeros)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b: tokens x intermediate activations of the anchor expert and the other one on the same tokens."""
        a, b = a.double(), b.double()
        self.tokens += len(a)
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def correlation(self) -> torch.Tensor:
        """anchor neurons x other neurons; a neuron that never varies correlates 0 with every other."""
        n = max(self.tokens, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        covariance = self.cross / n - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        scale = torch.outer(std_a, std_b)
        return torch.where(scale > 0, covariance / scale.clamp_min(1e-300), torch.zeros_like(covariance))


def best_permutation(correlation: torch.Tensor) -> torch.Tensor:
    """The permutation p maximising sum_i correlation[i, p[i]]: neuron p[i] of the other expert goes to
    position i, beside the anchor's neuron i (exact, Hungarian method)."""
    # Imported here: scipy.optimize takes ~0.5 s to import, which every CLI start would pay otherwise.
    from scipy.optimize import linear_sum_assignment

    rows, columns = linear_sum_assignment(correlation.cpu().numpy().astype(np.float64), maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(columns, dtype=torch.long)
    return permutation
