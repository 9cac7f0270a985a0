"""Small files people read and pipes parse: YAML or JSON by suffix, written atomically, validated on load."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from .errors import UsageError, first_line
from .outputs import write_atomically

# Documents are dataclasses validated by pydantic on load: unknown keys refused, and strict types
# written into the annotations (StrictInt, StrictStr, ...), since pydantic's strict mode would also
# refuse the plain mappings a YAML file holds for the nested dataclasses.
DOCUMENT_CONFIG = ConfigDict(extra="forbid")


def describe_errors(exc: ValidationError) -> str:
    """Every validation error on one line: `where: what (got value)`."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "top level"
        if error["type"] == "literal_error":  # a name outside its list
            parts.append(f"{where}: {error['input']!r} is not one of {error['ctx']['expected']}")
        elif error["type"] == "value_error":  # a validator's own message, without pydantic's "Value error, "
            parts.append(f"{where}: {error['ctx']['error']}")
        elif error["type"] == "missing":
            parts.append(f"{where}: {error['msg']}")
        else:
            parts.append(f"{where}: {error['msg']} (got {_shown(error['input'])})")
    return "; ".join(parts)


def _shown(value) -> str:
    """A value's repr, cut short: a YAML alias bomb (`a: &a [1, 1, ...]`, nine levels) is cheap to load as
    shared lists, and its full repr would take hours and all memory."""
    import reprlib

    shortened = reprlib.Repr()
    shortened.maxlevel, shortened.maxlist, shortened.maxdict, shortened.maxstring = 2, 4, 4, 80
    return shortened.repr(value)


@functools.cache
def _validator(cls) -> TypeAdapter:
    return TypeAdapter(cls)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: YAML keeps the last one silently,
    so `keep: 6` ... `keep: 4` would run with 4 while the reader of the file sees 6."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                line = key_node.start_mark.line + 1
                message = f"key {key!r} appears again on line {line}; keep one"
                raise yaml.constructor.ConstructorError(None, None, message)
        return super().construct_mapping(node, deep)


_TOO_DEEP = "it nests deeper than Python's recursion limit"


def load_yaml(text: str):
    """YAML as `yaml.safe_load` reads it, except that a mapping naming one key twice is an error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:  # `[[[[...]]]]` thousands deep: the parser recurses once per level
        raise yaml.YAMLError(_TOO_DEEP) from None


def named_twice(values: list) -> list:
    """The values that occur more than once in `values`, sorted (by their text, so mixed types sort)."""
    return sorted({v for v in values if values.count(v) > 1}, key=str)


def _unique_pairs(pairs: list) -> dict:
    """json.loads' object hook: like `load_yaml`, a key given twice is an error, not the last one silently."""
    twice = named_twice([key for key, _ in pairs])
    if twice:
        raise ValueError(f"key {twice[0]!r} appears twice in one object; keep one")
    return dict(pairs)


def load_json(text: str):
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None


def format_of(path: Path) -> str:
    return "json" if Path(path).suffix == ".json" else "yaml"


def dumps(data: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """A safetensors file with the mode of any other new file: safetensors creates it 0600, which would
    keep a checkpoint meant to be served or uploaded from other users whatever the umask says."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_mapping(path: Path, what: str, fix: str) -> dict:
    """A YAML or JSON mapping; `what` names it and `fix` says where a good one comes from."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a directory, or a FIFO that would block the read for ever
        raise UsageError(f"{what} {path} is not a regular file; {fix}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found; {fix}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path} ({exc.strerror}); {fix}") from None
    fmt = format_of(path)
    try:
        text = raw.decode("utf-8")
        data = load_json(text) if fmt == "json" else load_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{what} {path} is not valid {fmt.upper()}: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} is not a mapping; {fix}")
    return data


class Document:
    """A versioned dataclass file: `kind` and `schema_version` first, then the fields.

    Subclasses are dataclasses with `kind` and `schema_version` fields, set WHAT (how errors name
    the file) and REMEDY (the command that writes a good one), and may add `structure_errors`
    (rules across fields that types cannot say)."""

    WHAT: ClassVar[str]
    REMEDY: ClassVar[str]
    __pydantic_config__ = DOCUMENT_CONFIG

    def to_dict(self) -> dict:
        data = asdict(self)
        head = {k: data.pop(k) for k in ("kind", "schema_version")}
        return {**head, **data}

    def dumps(self, fmt: str) -> str:
        return dumps(self.to_dict(), fmt)

    def save(self, path: Path, overwrite: bool = True) -> Path:
        return write_atomically(path, self.dumps(format_of(path)), overwrite)

    def structure_errors(self) -> list[str]:
        return []

    @classmethod
    def from_dict(cls, data: dict):
        kind, schema = cls.__dataclass_fields__["kind"].default, cls.__dataclass_fields__["schema_version"].default
        found = data.get("kind")
        if found != kind:
            what = f"it is a {found} file" if str(found).startswith("moe-sparsify-") else f"missing kind: {kind}"
            raise UsageError(f"not a moe-sparsify {cls.WHAT} ({what}); {cls.REMEDY}")
        if data.get("schema_version") != schema:
            raise UsageError(f"{cls.WHAT} schema {data.get('schema_version')} is not {schema}; {cls.REMEDY}")
        try:
            document = _validator(cls).validate_python(data)
        except ValidationError as exc:
            raise UsageError(f"malformed {cls.WHAT}: {describe_errors(exc)}; {cls.REMEDY}") from None
        errors = document.structure_errors()
        if errors:
            raise UsageError(f"malformed {cls.WHAT}: {'; '.join(errors)}; {cls.REMEDY}")
        return document

    @classmethod
    def load(cls, path: Path):
        return cls.from_dict(load_mapping(path, cls.WHAT, cls.REMEDY))

    def check_same_model(self, recorded, actual, remedy: str) -> None:
        """Refuse a document made for another model, naming every difference of the two records. Router
        weights that differ only as another precision rounds them (the records' dtypes differ, their
        router norms agree) are the same model: a plan made in float32 applies to the bfloat16 load."""
        mine, theirs = asdict(recorded), asdict(actual)
        differing = [k for k in mine if k not in _PRECISION_KEYS and mine[k] != theirs[k]]
        if differing == ["router_sha256"] and _rounded_alike(mine, theirs):
            return
        diffs = [f"{k} {mine[k]!r} in the {self.WHAT}, {theirs[k]!r} in the model" for k in differing]
        if differing == ["router_sha256"] and mine.get("router_norms") is None:  # a file written before the norms
            remedy += "; if it is this model, load it in the --dtype the file was made with (a lower precision rounds"
            remedy += " the router weights it is recognised by)"
        if diffs:
            raise UsageError(
                f"the {self.WHAT} does not match this model: its numbers belong to another model "
                f"({'; '.join(diffs)}); {remedy}"
            )


# Identity records' precision keys: they explain a router hash that differs, they do not identify a model.
_PRECISION_KEYS = ("router_dtype", "router_norms")


def _rounded_alike(mine: dict, theirs: dict) -> bool:
    """Routers loaded in two precisions: the per-layer norm sums agree to far better than 1e-3 (rounding to
    bfloat16 moves a row's norm by ~1e-5 of it), another model's do not."""
    if any(record.get(key) is None for record in (mine, theirs) for key in _PRECISION_KEYS):
        return False
    if mine["router_dtype"] == theirs["router_dtype"] or len(mine["router_norms"]) != len(theirs["router_norms"]):
        return False
    layers = zip(mine["router_norms"], theirs["router_norms"])
    return all(math.isclose(x, y, rel_tol=1e-3) for a, b in layers for x, y in zip(a, b))
