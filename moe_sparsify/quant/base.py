"""The interface one quantized checkpoint format implements (see the package docstring)."""

from __future__ import annotations

import importlib.util
import re
from typing import ClassVar

import torch

from ..errors import UsageError

# A name in a module list (modules_to_not_convert, ignore) that names one routed expert, once
# ".weight" is appended so module names and weight names read alike.
_EXPERT_ENTRY = re.compile(r"^(?P<head>.*\.layers\.(?P<layer>\d+)\..*\.experts\.)(?P<expert>\d+)(?P<tail>\..+)$")


class QuantFormat:
    """One on-disk quantization format, built from the checkpoint's `quantization_config` dict.

    Subclasses set `quant_method` (the config's key for it), `label` (how messages name it),
    `roles` (the raw tensors of one logical weight, the codes' role first) and implement
    `split`, `dequantize` and `reference_dequantize`.
    """

    quant_method: ClassVar[str]
    label: ClassVar[str]
    roles: ClassVar[tuple[str, ...]]
    # Roles a logical weight may lack (e.g. FP8's static `activation_scale`).
    optional_roles: ClassVar[tuple[str, ...]] = ()
    # (import name, pip requirement) that transformers needs to load this format on the CPU.
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: dict):
        self.config = config

    # --- which raw tensors make one logical weight -------------------------------------------------
    def split(self, name: str) -> tuple[str, str] | None:
        """(logical weight name, role) of a raw tensor that may belong to a quantized weight, else None.
        The logical name is what a float checkpoint calls that weight (`...down_proj.weight`)."""
        raise NotImplementedError

    def group(self, names) -> dict[str, dict[str, str]]:
        """Logical weight -> {role: raw tensor name}, for the weights stored quantized. A name `split`
        claims whose group lacks a required role is a tensor stored as is (a norm's `.weight`)."""
        groups: dict[str, dict[str, str]] = {}
        for name in names:
            if (hit := self.split(name)) is not None:
                groups.setdefault(hit[0], {})[hit[1]] = name
        required = set(self.roles) - set(self.optional_roles)
        return {logical: parts for logical, parts in groups.items() if required <= parts.keys()}

    def export_alias(self, name: str) -> str:
        """The name under which the adapter's tensor rules classify a raw tensor on export: its
        logical weight's name, so fused scales are sliced along the expert axis like their codes."""
        hit = self.split(name)
        return hit[0] if hit is not None else name

    # --- decoding ------------------------------------------------------------------------------------
    def dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight the search runs on, from the raw tensors of one logical weight."""
        raise NotImplementedError

    def reference_dequantize(self, logical: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same weight decoded by a separate, plain implementation of the format's documented
        semantics. Verification decodes the export with it, so a wrong `dequantize` cannot agree
        with itself."""
        raise NotImplementedError

    def transformers_decodes(self, shapes: dict[str, dict[str, tuple[int, ...]]]) -> bool:
        """Whether transformers' own CPU load decodes tensors of these shapes (logical -> role -> shape)
        exactly; where not, verification uses `reference_dequantize`."""
        return True

    def transformers_load_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained` that make transformers decode the weights to float."""
        return {}

    # --- export ----------------------------------------------------------------------------------------
    def pruned_config(self, quantization_config: dict, kept: dict[int, list[int]]) -> list[str]:
        """Rewrite, in place, every list of module names that names routed experts: entries of removed
        experts go, kept ones are renumbered. Returns 'quantization_config.KEY: ...' change lines."""
        changes = []
        for key, value in quantization_config.items():
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                continue
            updated = [name for name in (_renumbered(v, kept) for v in value) if name is not None]
            if updated != value:
                changes.append(f"quantization_config.{key}: {len(value)} -> {len(updated)} entries, experts renumbered")
                quantization_config[key] = updated
        return changes

    def check_requirements(self) -> None:
        """Refuse in one line, naming the pip command, when a package the format needs is missing."""
        for module, requirement in self.requires:
            if importlib.util.find_spec(module) is None:
                raise UsageError(
                    f"{self.label} checkpoints need {module} (transformers loads them with it to verify the export): "
                    f'pip install "{requirement}"'
                )


def _renumbered(entry: str, kept: dict[int, list[int]]) -> str | None:
    """A module-list entry with its expert renumbered, None for a removed expert, as is otherwise."""
    m = _EXPERT_ENTRY.match(entry + ".weight")
    if m is None or int(m["layer"]) not in kept:
        return entry
    experts = kept[int(m["layer"])]
    if int(m["expert"]) not in experts:
        return None
    return f"{m['head']}{experts.index(int(m['expert']))}{m['tail']}".removesuffix(".weight")
