"""The pruning plan: which experts each layer keeps, and why.

`prune` writes it, `export` and `eval` read it. YAML for people, JSON for
pipes (chosen by file suffix); both round-trip to the same object. The plan
holds no timestamps or timings, so the same inputs give byte-identical files.
A per-layer keep count is expressible (lists of different lengths); stock
transformers configs hold one expert count, so `export` refuses such plans.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import StrictFloat, StrictInt, StrictStr, with_config

from .files import DOCUMENT_CONFIG, Document

SCHEMA_VERSION = 1
KIND = "moe-sparsify-plan"


@with_config(DOCUMENT_CONFIG)
@dataclass
class LayerPlan:
    layer: StrictInt
    kept: list[StrictInt]  # original expert ids, ascending
    loss: StrictFloat  # mean per-token squared reconstruction error of the kept set
    runner_up_loss: StrictFloat | None  # best other subset the strategy scored
    subsets_scored: StrictInt
    divergence: StrictFloat | None = None  # e2e: KL(original || pruned) of next-token distributions


@with_config(DOCUMENT_CONFIG)
@dataclass
class ModelIdentity:
    model_type: StrictStr
    num_layers: StrictInt
    num_experts: StrictInt
    top_k: StrictInt
    moe_layers: list[StrictInt]
    router_sha256: StrictStr
    router_dtype: StrictStr | None = None  # absent from plans written before: then the hash alone decides
    router_norms: list[list[StrictFloat]] | None = None


@dataclass
class Plan(Document):
    WHAT: ClassVar[str] = "plan"
    REMEDY: ClassVar[str] = "pass the file written by `moe-sparsify prune`"

    source: StrictStr
    model: ModelIdentity
    strategy: StrictStr
    mode: StrictStr
    seed: StrictInt
    calibration: dict
    versions: dict
    layers: list[LayerPlan]
    schema_version: StrictInt = SCHEMA_VERSION
    kind: StrictStr = KIND
    options: dict = field(default_factory=dict)

    def kept(self) -> dict[int, list[int]]:
        return {lp.layer: lp.kept for lp in self.layers}

    def uniform_keep(self) -> int | None:
        counts = {len(lp.kept) for lp in self.layers}
        return counts.pop() if len(counts) == 1 else None

    def sha256(self) -> str:
        return hashlib.sha256(self.dumps("json").encode()).hexdigest()

    def structure_errors(self) -> list[str]:
        """Each MoE layer of the plan's model exactly once, each keeping valid, distinct experts."""
        identity, errors = self.model, []
        if not self.layers:
            return ["it lists no layers"]
        seen = [lp.layer for lp in self.layers]
        for index in sorted(set(seen)):
            if index not in identity.moe_layers:
                errors.append(f"layer {index} is not one of the MoE layers {identity.moe_layers}")
            if seen.count(index) > 1:
                errors.append(f"layer {index} appears {seen.count(index)} times")
        errors += [f"MoE layer {index} is missing" for index in identity.moe_layers if index not in seen]
        for lp in self.layers:
            bad = [e for e in lp.kept if not 0 <= e < identity.num_experts]
            if bad or len(set(lp.kept)) != len(lp.kept):
                errors.append(f"layer {lp.layer} keeps invalid experts {lp.kept} (ids 0..{identity.num_experts - 1})")
            elif len(lp.kept) < identity.top_k:
                errors.append(f"layer {lp.layer} keeps {len(lp.kept)} experts, fewer than top_k={identity.top_k}")
        return errors

    def check_matches(self, identity: ModelIdentity) -> None:
        """Refuse a plan made for another model, naming every difference."""
        self.check_same_model(self.model, identity, "re-run prune for this model")


def load_plan(path: Path) -> Plan:
    return Plan.load(path)
