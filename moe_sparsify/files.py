"""Small files people read and pipes parse: YAML or JSON by suffix, written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

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


class Document:
    """A versioned dataclass file: `kind` and `schema_version` first, then the fields.

    Subclasses are dataclasses with `kind` and `schema_version` fields and set WHAT (how errors name
    the file), REMEDY (the command that writes a good one) and `_build` (nested dataclasses)."""

    WHAT: ClassVar[str]
    REMEDY: ClassVar[str]

    def to_dict(self) -> dict:
        data = asdict(self)
        head = {k: data.pop(k) for k in ("kind", "schema_version")}
        return {**head, **data}

    def dumps(self, fmt: str) -> str:
        return dumps(self.to_dict(), fmt)

    def save(self, path: Path, overwrite: bool = True) -> Path:
        return write_atomically(path, self.dumps(format_of(path)), overwrite)

    @classmethod
    def _build(cls, fields: dict):
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict):
        kind, schema = cls.__dataclass_fields__["kind"].default, cls.__dataclass_fields__["schema_version"].default
        if data.get("kind") != kind:
            raise UsageError(f"not a moe-sparsify {cls.WHAT} (missing kind: {kind}); {cls.REMEDY}")
        if data.get("schema_version") != schema:
            raise UsageError(f"{cls.WHAT} schema {data.get('schema_version')} is not {schema}; {cls.REMEDY}")
        try:
            return cls._build(dict(data))
        except (KeyError, TypeError) as exc:
            raise UsageError(f"malformed {cls.WHAT}: {exc}") from None

    @classmethod
    def load(cls, path: Path):
        return cls.from_dict(load_mapping(path, cls.WHAT, cls.REMEDY))
