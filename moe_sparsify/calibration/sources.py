"""Calibration text sources and their spec strings.

bundled                 the package's calib split of the offline corpus (default)
bundled:heldout         its held-out split (the default for `eval`)
c4, math, code          a named hub dataset, pinned (presets.py; the hub aliases default to c4)
path/to/file.txt        plain text
path/to/file.jsonl      one JSON object per line, field "text"
path/to/file.json.gz    the same, gzip-compressed (C4's own shard format; also .jsonl.gz)
path/to/file.json       a list of strings, or of objects with "text"
path/to/file.parquet    a "text" column (needs pyarrow)
hf:NAME[:CONFIG][@SPLIT]  a Hugging Face dataset (needs `datasets` and a network)
a=0.7,b=0.3             a mix: comma-separated SOURCE=WEIGHT
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..corpus import DOCUMENT_SEPARATOR, bundled_text
from ..errors import UsageError, first_line
from .presets import PRESETS, is_preset, preset_documents

TEXT_FIELD = "text"
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".json.gz", ".jsonl.gz")
_GZIP_LINES = (".json.gz", ".jsonl.gz")


@dataclass(frozen=True)
class SourceSpec:
    source: str
    weight: float = 1.0


def parse_sources(spec: str | list) -> list[SourceSpec]:
    """A spec string or a YAML list of {source, weight} / strings."""
    if isinstance(spec, list):
        items = [SourceSpec(**i) if isinstance(i, dict) else SourceSpec(str(i)) for i in spec]
    else:
        items = []
        for part in str(spec).split(","):
            source, _, weight = part.strip().rpartition("=") if "=" in part else (part.strip(), "", "1")
            try:
                items.append(SourceSpec(source.strip(), float(weight)))
            except ValueError:
                raise UsageError(
                    f"calibration weight {weight!r} in {part!r} is not a number; write SOURCE=0.5"
                ) from None
    if not items or any(not i.source for i in items):
        raise UsageError(f"empty calibration source; pass --calibration bundled, {_preset_names()}, a file, or hf:NAME")
    if any(not math.isfinite(i.weight) or i.weight <= 0 for i in items):  # nan and inf included
        raise UsageError("calibration weights must be positive finite numbers; write e.g. a.txt=0.7,b.txt=0.3")
    return items


def _preset_names() -> str:
    return ", ".join(PRESETS)


def check_source(source: str) -> None:
    """Validation before any weights are read. A preset is fetched now (then cached), so that being
    offline fails here rather than after loading the model."""
    if source in ("bundled", "bundled:calib", "bundled:heldout"):
        return
    if source.startswith("hf:"):
        if not source[3:].partition("@")[0].partition(":")[0]:
            raise UsageError(f"text source {source!r} names no dataset; write hf:NAME, hf:NAME:CONFIG or hf:NAME@SPLIT")
        return
    if is_preset(source):
        preset_documents(source)
        return
    path = Path(source)
    if not path.is_file():
        raise UsageError(
            f"text source {source!r} is not a file (--calibration, --text); pass bundled, a preset "
            f"({_preset_names()}), a local .txt/.jsonl/.json/.json.gz/.parquet file, or hf:NAME"
        )
    if not path.name.endswith(FILE_SUFFIXES):
        raise UsageError(f"text file {source!r} has suffix {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def load_documents(source: str) -> list[str]:
    check_source(source)
    if source.startswith("bundled"):
        split = source.partition(":")[2] or "calib"
        return bundled_text(split).split(DOCUMENT_SEPARATOR)
    if source.startswith("hf:"):
        return _hf_documents(source[3:])
    if is_preset(source):
        return list(preset_documents(source))
    path = Path(source)
    if path.suffix == ".parquet":
        documents = _parquet_documents(path)
    else:
        documents = _text_file_documents(path, _read_text(path))
    if not any(document.strip() for document in documents):
        raise UsageError(f"text source {source!r} holds no text; pass a file with some")
    return documents


def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(_GZIP_LINES):
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                return lines.read()
        return path.read_text(encoding="utf-8")
    except (EOFError, gzip.BadGzipFile) as exc:
        raise UsageError(f"{path} is not a complete gzip file ({exc}); download it again") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {exc.start}); pass a UTF-8 .txt/.jsonl/.json file or a .parquet"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None


def _text_file_documents(path: Path, text: str) -> list[str]:
    if path.suffix == ".txt":
        return [text]
    if path.suffix == ".jsonl" or path.name.endswith(_GZIP_LINES):  # C4's shards: JSON lines, gzipped
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_json(line, f"{path} line {number}", "one JSON object per line"))
        return [_text_of(row, str(path)) for row in rows]
    data = _json(text, str(path), f"a list of strings or of objects with {TEXT_FIELD!r}")
    if isinstance(data, dict) and isinstance(data.get(TEXT_FIELD), list):
        data = data[TEXT_FIELD]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of strings or of objects with {TEXT_FIELD!r}")
    return [_text_of(row, str(path)) for row in data]


def _json(text: str, where: str, expected: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not valid JSON ({exc}); expected {expected}") from None


def _parquet_documents(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading .parquet needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(path, columns=[TEXT_FIELD])
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(
            f"cannot read {path} as a parquet table with a {TEXT_FIELD!r} column ({first_line(exc)}); check the file"
        ) from None
    return [str(t) for t in table.column(TEXT_FIELD).to_pylist()]


def _text_of(row, source: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get(TEXT_FIELD), str):
        return row[TEXT_FIELD]
    raise UsageError(f"{source}: every record needs a string field {TEXT_FIELD!r}")


def _hf_documents(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("hf: sources need the `datasets` package; pip install datasets") from None
    name, _, split = name.partition("@")
    path, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(path, config or None, split=split or "train")
    except Exception as exc:  # the hub raises many types; all mean the same to the user
        raise UsageError(f"could not load dataset {path!r}: {exc}; check the name or use a local file") from None
    return [str(t) for t in data[TEXT_FIELD]]
