"""What ships in `configs/`: the model aliases (models.yaml) and the example settings files.

Settings validation reads these, so this module imports no torch and no model code: `config` can
resolve a `--model` alias or a `--config` name without loading either.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml


def configs_dir() -> Path:
    """`configs/` ships inside the package as `moe_sparsify.configs`; from a bare checkout it sits beside it."""
    try:
        return Path(str(resources.files("moe_sparsify.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


def model_aliases() -> dict[str, dict]:
    # libyaml's safe loader where PyYAML has it (its wheels do): a tenth of the pure-Python parse, read on
    # every command; the shipped file needs no user-facing error messages, which the pure one writes better.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load((configs_dir() / "models.yaml").read_text(), Loader=loader)  # noqa: S506 (a safe loader)
    return {name: (entry if isinstance(entry, dict) else {"path": entry}) for name, entry in data.items()}
