"""The bundled offline corpus: English text that every CPython install carries.

Documents are the `pydoc_data.topics` help pages plus the docstrings of the
standard library's modules, classes and functions (read with `ast`, nothing is
imported). Each document goes to one split by a hash of its name, so the split
is stable however the list grows:

    train    85 %  what the bundled model was trained on
    calib    10 %  the default calibration text
    heldout   5 %  the default evaluation text (seen by neither of the others)

The stdlib differs between Python versions, so the calib and heldout splits
used at run time are the copies frozen into the package by
`scripts/train_tiny_moe.py` (`assets/corpus/*.txt.gz`); `build_documents()`
is only needed to retrain.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import sysconfig
from importlib import resources
from pathlib import Path

SPLITS = ("train", "calib", "heldout")
# Packages whose docstrings are tests, GUIs or demos rather than prose.
_SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
_MIN_DOCSTRING_CHARS = 80
DOCUMENT_SEPARATOR = "\n\n"


def split_of(name: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 100
    if bucket < 85:
        return "train"
    return "calib" if bucket < 95 else "heldout"


def _stdlib_docstrings() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIPPED_STDLIB_DIRS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                name = getattr(node, "name", "<module>")
                docs.append((f"stdlib:{rel.as_posix()}:{name}:{getattr(node, 'lineno', 0)}", doc))
    return docs


def build_documents() -> list[tuple[str, str]]:
    """(name, text) for every document, in a fixed order."""
    import pydoc_data.topics

    topics = [(f"topic:{key}", text) for key, text in sorted(pydoc_data.topics.topics.items())]
    return topics + _stdlib_docstrings()


def split_text(documents: list[tuple[str, str]], split: str) -> str:
    return DOCUMENT_SEPARATOR.join(text for name, text in documents if split_of(name) == split)


def bundled_text(split: str) -> str:
    """The frozen calib or heldout split shipped inside the package."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"bundled corpus has splits 'calib' and 'heldout', not {split!r}")
    ref = resources.files("moe_sparsify") / "assets" / "corpus" / f"{split}.txt.gz"
    with ref.open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")
