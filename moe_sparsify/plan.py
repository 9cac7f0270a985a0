"""The pruning plan: which experts each layer keeps, and why.

`prune` writes it, `export` and `eval` read it. YAML for people, JSON for
pipes (chosen by file suffix); both round-trip to the same object. The plan
holds no timestamps or timings, so the same inputs give byte-identical files.
A per-layer keep count is expressible (lists of different lengths); stock
transformers configs hold one expert count, so `export` refuses such plans.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from .errors import UsageError
from .files import Document

SCHEMA_VERSION = 1
KIND = "moe-sparsify-plan"


@dataclass
class LayerPlan:
    layer: int
    kept: list[int]  # original expert ids, ascending
    loss: float  # mean per-token squared reconstruction error of the kept set
    runner_up_loss: float | None  # best other subset the strategy scored
    subsets_scored: int
    divergence: float | None = None  # e2e: KL(original || pruned) of next-token distributions


@dataclass
class ModelIdentity:
    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    moe_layers: list[int]
    router_sha256: str


@dataclass
class Plan(Document):
    WHAT: ClassVar[str] = "plan"
    REMEDY: ClassVar[str] = "pass the file written by `moe-sparsify prune`"

    source: str
    model: ModelIdentity
    strategy: str
    mode: str
    seed: int
    calibration: dict
    versions: dict
    layers: list[LayerPlan]
    schema_version: int = SCHEMA_VERSION
    kind: str = KIND
    options: dict = field(default_factory=dict)

    def kept(self) -> dict[int, list[int]]:
        return {lp.layer: lp.kept for lp in self.layers}

    def uniform_keep(self) -> int | None:
        counts = {len(lp.kept) for lp in self.layers}
        return counts.pop() if len(counts) == 1 else None

    @classmethod
    def _build(cls, fields: dict) -> Plan:
        fields["model"] = ModelIdentity(**fields["model"])
        fields["layers"] = [LayerPlan(**lp) for lp in fields["layers"]]
        return cls(**fields)

    def sha256(self) -> str:
        return hashlib.sha256(self.dumps("json").encode()).hexdigest()

    def check_matches(self, identity: ModelIdentity) -> None:
        """Refuse a plan made for another model, naming every difference."""
        mine, theirs = asdict(self.model), asdict(identity)
        diffs = [f"{k} {mine[k]!r} in the plan, {theirs[k]!r} in the model" for k in mine if mine[k] != theirs[k]]
        if diffs:
            raise UsageError(f"the plan does not match this model: {'; '.join(diffs)}; re-run prune for this model")
        for lp in self.layers:
            if lp.layer not in identity.moe_layers:
                raise UsageError(f"plan names layer {lp.layer}, which is not an MoE layer of this model")
            bad = [e for e in lp.kept if not 0 <= e < identity.num_experts]
            if bad or len(set(lp.kept)) != len(lp.kept):
                raise UsageError(f"plan layer {lp.layer} keeps invalid experts {lp.kept}")
            if len(lp.kept) < identity.top_k:
                raise UsageError(
                    f"plan layer {lp.layer} keeps {len(lp.kept)} experts, fewer than top_k={identity.top_k}"
                )


def load_plan(path: Path) -> Plan:
    return Plan.load(path)
