"""README.md's examples run as written, in order, in an empty directory, so they cannot rot.

A block is skipped only when an HTML comment right above it says why:
    <!-- readme-test: setup -->     installs packages (the test runs in an environment already set up)
    <!-- readme-test: checkout -->  needs the clone itself (the test suite, make)
    <!-- readme-test: hub -->       needs the hub and a large model
    <!-- readme-test: slow -->      minutes on 2 cores (e2e search with recovery); runs the same way by hand
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from moe_sparsify.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SKIPPED = {"setup", "checkout", "hub", "slow"}
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[\w-]+) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)


def blocks() -> list[tuple[str | None, str, str]]:
    return [(m["mark"], m["lang"], m["body"]) for m in BLOCK.finditer(README)]


def test_every_skip_mark_is_known_and_the_rest_runs_offline():
    marks = {mark for mark, _, _ in blocks() if mark}
    assert marks <= SKIPPED, marks - SKIPPED
    for mark, _, body in blocks():
        if mark is None:  # hub aliases cannot run in the test (offline, and gigabytes)
            assert not re.search(r"--model (mixtral|qwen|olmoe|deepseek)", body), body


def test_readme_examples_run_in_order_in_an_empty_directory(tmp_path):
    shim = tmp_path / "bin"  # `moe-sparsify` from this checkout, with this interpreter
    shim.mkdir()
    (shim / "moe-sparsify").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m moe_sparsify "$@"\n')
    (shim / "moe-sparsify").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",  # a block that reaches for the hub fails at once instead of hanging
    }
    ran = 0
    for mark, lang, body in blocks():
        if mark in SKIPPED:
            continue
        command = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README block failed:\n{body}\nstderr:\n{done.stderr[-3000:]}"
        ran += 1
    assert ran >= 5


def _table_rows() -> list[list[str]]:
    section = README.split("Which command takes which\nsetting flag:")[1].split("\n\n")[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()]
    header, _, *body = rows
    assert header[1:] == ["calibrate", "prune", "export", "eval", "skip-profile"]
    return [header, *body]


@pytest.mark.parametrize("column", range(1, 6))
def test_readme_flag_table_matches_each_command(column):
    header, *rows = _table_rows()
    command = typer.main.get_command(app).commands[header[column]]
    takes = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for row in rows:
        flags = re.findall(r"`(--[\w-]+)", row[0])
        assert flags, row
        for flag in flags:
            assert (flag in takes) == bool(row[column]), f"{header[column]} {flag}: README says {row[column]!r}"
