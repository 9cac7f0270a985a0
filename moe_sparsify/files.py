"""Small files people read and pipes parse: YAML or JSON by suffix, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UsageError


def format_of(path: Path) -> str:
    return "json" if Path(path).suffix == ".json" else "yaml"


def dumps(data: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def write_atomically(path: Path, text: str, overwrite: bool = True) -> Path:
    """Write beside the target and rename, so readers never see half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite or choose another --output")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_mapping(path: Path, what: str, fix: str) -> dict:
    """A YAML or JSON mapping; `what` names it and `fix` says where a good one comes from."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError:
        raise UsageError(f"cannot read {what} {path}; {fix}") from None
    fmt = format_of(path)
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"{what} {path} is not valid {fmt.upper()}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} is not a mapping; {fix}")
    return data
