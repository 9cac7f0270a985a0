"""The package's imports point one way: no module imports another that (through any chain) imports it
back, counting imports made inside functions too (a function-level import that closes a cycle hides
the cycle without removing it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import moe_sparsify

KNOWN_CYCLES: set[tuple[str, str]] = set()  # none: name one here only with the reason it must stay


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative imports, at any depth of the file)."""
    files = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
            targets |= {f"{base}.{alias.name}" for alias in node.names} | {base}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Each import a -> b (as a sorted pair) from which a is reachable again."""
    found = set()
    for start, targets in graph.items():
        for target in targets:
            seen, stack = {target}, [target]
            while stack:
                module = stack.pop()
                if module == start:
                    found.add(tuple(sorted((start, target))))
                    break
                for nxt in graph.get(module, ()) - seen:
                    seen.add(nxt)
                    stack.append(nxt)
    return found


def test_the_package_has_no_import_cycle_beyond_the_known_one():
    package = Path(moe_sparsify.__file__).parent
    assert cycles(import_graph(package)) - KNOWN_CYCLES == set()


def test_a_cycle_closed_by_an_import_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (package / "high.py").write_text("from .low import f\n\n\ndef g():\n    return f\n")
    (package / "apart.py").write_text("from . import low\n")
    assert cycles(import_graph(package)) == {("pkg.high", "pkg.low")}


def test_the_command_line_and_settings_load_without_torch_or_any_algorithm_module():
    """`--help`, a bad flag or a bad settings file answer without torch and transformers (~2 s to import):
    the command line imports the commands only when one runs, and validating settings (config, which
    the command line imports) reads the shipped aliases and names, not the model loaders or the
    algorithms (a config that imported `models` for its alias list once did)."""
    algorithms = ["commands", "models", "prune", "search", "routing", "evaluate", "objective"]
    watched = ["moe_sparsify.config", "torch", "transformers", *(f"moe_sparsify.{name}" for name in algorithms)]
    code = f"import sys, moe_sparsify.cli; print(sorted(m for m in sys.modules if m in {watched!r}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['moe_sparsify.config']"
