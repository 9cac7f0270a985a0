"""What every recovery method shares: its settings (`Recovery`), a layer's calibration tokens split into
fitted and held-back batches (`LayerData`), the layer loss a change is judged by, and the guard that
keeps a change only where that loss allows (`guarded_report`).

The methods build on this module (router re-calibration and expert re-fitting in recover.py, merging
in merge.py), and recover.py applies them in order: the imports point one way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import MoEAdapter
from .choices import DEFAULT_MERGE_BY, DEFAULT_RECOVER_HOLDOUT


@dataclass(frozen=True)
class Recovery:
    """How to recover: which methods (applied in the order of RECOVERY_METHODS) and their guard."""

    methods: tuple[str, ...]
    holdout: float = DEFAULT_RECOVER_HOLDOUT  # share of calibration sequences held back to judge a change
    router_steps: int = 200
    router_lr: float = 0.01  # Adam step, relative to the RMS of the kept router rows
    router_patience: int = 20  # steps without a better held-back loss before stopping
    refit_damp: float = 0.01
    refit_sweeps: int = 2
    merge_by: str = DEFAULT_MERGE_BY  # which kept expert a removed one joins: closest mean output, or router logits
    merge_align: bool = False  # permute each removed expert's neurons to match its kept expert's before averaging

    def record(self, layers: list[dict]) -> dict:
        """What a plan records: the methods, the guard, and each layer's reports."""
        merging = {"merge_by": self.merge_by, "merge_align": self.merge_align} if "merge" in self.methods else {}
        return {"methods": list(self.methods), "holdout": self.holdout, **merging, "layers": layers}


@dataclass(frozen=True)
class RecoveryReport:
    """One method on one layer: mean per-token losses before and after, on fitted and held-back tokens,
    and with an end-to-end judge, the mean next-token KL on the held-back batches before and after.
    A change the layer losses refuse reports its before values as after; one they accept but the
    end-to-end KL refuses reports what it reached (so the KL that refused it is on record)."""

    method: str
    accepted: bool
    fit_before: float
    fit_after: float
    held_before: float
    held_after: float
    steps: int
    end_to_end_before: float | None = None
    end_to_end_after: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LayerData:
    """One MoE layer's calibration tokens: the block's inputs x' and the target y of its whole output
    (shared experts included), in chunks of rows, one per calibration batch; `fit` and `held` split them
    by whole batches (the held-back ones are also run end to end: `guard.EndToEndGuard`)."""

    fit: list[tuple[torch.Tensor, torch.Tensor]]
    held: list[tuple[torch.Tensor, torch.Tensor]]
    held_batches: range = range(0)  # the held-back chunks' indices among all chunks

    @classmethod
    def split(cls, inputs: list[torch.Tensor], targets: list[torch.Tensor], holdout: float) -> LayerData:
        """Hold back the last round(holdout x batches) batches (at least one, and at least one fitted)."""
        batches = len(inputs)
        if batches < 2:
            raise ValueError(
                "recovery holds back whole calibration batches: it needs at least two "
                "(more sequences than --batch-size)"
            )
        held = min(max(round(holdout * batches), 1), batches - 1)
        pairs = list(zip(inputs, targets, strict=True))
        return cls(pairs[: batches - held], pairs[batches - held :], range(batches - held, batches))


def layer_loss(adapter: MoEAdapter, block: nn.Module, keep: torch.Tensor, chunks) -> float:
    """Mean per-token ||F'(x', C) - y||^2 through the reference routed forward (float64 sums)."""
    total, count = 0.0, 0
    for x, y in chunks:
        out = block_output(adapter, block, x, keep)
        total += ((out.float() - y.float()) ** 2).sum().double().item()
        count += len(x)
    return total / max(count, 1)


def block_output(adapter: MoEAdapter, block: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The MoE block's output on rows x, pruned to `keep` (None: every expert), through the reference routed forward."""
    out = adapter.routed_forward(block, x, None if keep is None else keep.to(x.device))
    return out[0] if isinstance(out, tuple) else out


def guarded_report(
    method: str, improved: bool, before: tuple[float, float], after: tuple[float, float], steps: int, undo
) -> RecoveryReport:
    """The layer-loss guard every method shares. A change (`improved`: the method found one it would
    keep) stands only where the held-back loss falls and the fitted tokens' loss does not rise; else
    `undo()` puts the weights back and the report gives the before values as after.
    before, after: (fitted, held-back) mean per-token losses."""
    (fit_before, held_before), (fit_after, held_after) = before, after
    accepted = improved and held_after < held_before and fit_after <= fit_before
    if not accepted:
        undo()
        fit_after, held_after = fit_before, held_before
    return RecoveryReport(method, accepted, fit_before, fit_after, held_before, held_after, steps)
