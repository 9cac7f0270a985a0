"""README.md's examples run, in order, in an empty directory, so they cannot rot.

A block is skipped only when an HTML comment right above it says why:
    <!-- readme-test: setup -->     installs packages (the test runs in an environment already set up)
    <!-- readme-test: checkout -->  needs the clone itself (the test suite, make)
    <!-- readme-test: hub -->       needs the hub and a large model
    <!-- readme-test: slow -->      minutes on 2 cores (e2e search with recovery); runs the same way by hand

The default walk runs each plain `moe-sparsify ...` line in this process, with small sizes appended
(`QUICK`: fewer calibration tokens, a slice of the held-out text, one timed round): what it checks is
that every command, flag and file named in the README works and that each block's outputs feed the
next. `python -m pytest -m slow tests/test_readme.py` runs the blocks exactly as written, each command
in its own process, as a user would (minutes); CI runs both.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from moe_sparsify.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SKIPPED = {"setup", "checkout", "hub", "slow"}
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[\w-]+) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)
SHELL = re.compile(r"[|&;<>$`*?]")  # a line needing the shell: run it by bash, not in-process
SMALL_CALIBRATION = ["--samples", "8", "--seq-len", "64"]
QUICK = {  # appended, so they win over the README's own values of the same flags
    "calibrate": SMALL_CALIBRATION,
    "prune": SMALL_CALIBRATION,
    "skip-profile": SMALL_CALIBRATION,
    "eval": ["--limit", "20", "--repeats", "1", "--time-budget", "0", "--new-tokens", "4", "--prompt-len", "16"],
}


def blocks() -> list[tuple[str | None, str, str]]:
    return [(m["mark"], m["lang"], m["body"]) for m in BLOCK.finditer(README)]


def runnable_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for mark, lang, body in blocks() if mark not in SKIPPED]


def commands(body: str) -> list[str]:
    """A bash block's commands: backslash continuations joined, blank and comment-only lines dropped."""
    joined = body.replace("\\\n", " ")
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def _shim_env(tmp_path: Path) -> dict:
    """`moe-sparsify` on PATH as this checkout's module under this interpreter; the hub unreachable."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "moe-sparsify").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m moe_sparsify "$@"\n')
    (shim / "moe-sparsify").chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",  # a block that reaches for the hub fails at once instead of hanging
    }


def _bash(command: str, work: Path, env: dict) -> None:
    command_line = ["bash", "-euo", "pipefail", "-c", command]
    done = subprocess.run(command_line, cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"README command failed:\n{command}\nstderr:\n{done.stderr[-3000:]}"


def test_every_skip_mark_is_known_and_the_rest_runs_offline():
    marks = {mark for mark, _, _ in blocks() if mark}
    assert marks <= SKIPPED, marks - SKIPPED
    for mark, _, body in blocks():
        if mark is None:  # hub aliases cannot run in the test (offline, and gigabytes)
            assert not re.search(r"--model (mixtral|qwen|olmoe|deepseek)", body), body


def test_commands_split_as_bash_reads_them():
    body = "a --x 1   # note\n# only a comment\n\nb \\\n  --y 2\n"
    assert [shlex.split(c, comments=True) for c in commands(body)] == [["a", "--x", "1"], ["b", "--y", "2"]]


def test_readme_examples_run_in_order_in_an_empty_directory(tmp_path, monkeypatch, text):
    work = tmp_path / "work"
    work.mkdir()
    env = _shim_env(tmp_path)
    monkeypatch.chdir(work)
    quick = {**QUICK, "eval": [*map(str, text), *QUICK["eval"]]}
    runner = CliRunner()
    in_process = 0
    for lang, body in runnable_blocks():
        if lang == "python":
            exec(compile(body, "README.md", "exec"), {"__name__": "__main__"})
            continue
        for command in commands(body):
            argv = shlex.split(command, comments=True)
            if argv[0] != "moe-sparsify" or SHELL.search(command.split("#")[0]):
                _bash(command, work, env)
                continue
            args = [*argv[1:], *quick.get(argv[1], [])]
            result = runner.invoke(app, args)
            assert result.exit_code == 0, f"README command failed:\n{command}\nstderr:\n{result.stderr[-3000:]}"
            in_process += 1
    assert in_process >= 10


@pytest.mark.slow
def test_readme_examples_run_as_written_in_order_in_an_empty_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = _shim_env(tmp_path)
    for lang, body in runnable_blocks():
        command = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README block failed:\n{body}\nstderr:\n{done.stderr[-3000:]}"


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
