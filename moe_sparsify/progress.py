"""Progress of long steps on stderr: a rich bar on a terminal, plain periodic lines in a pipe or a log.

stdout carries results (one JSON object with --json), so progress always goes to stderr, whatever the
output format. Both reporters have the two methods the steps call: `add_task` and `advance`.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True, soft_wrap=True)  # a long path must not break a line a script may grep


@dataclass
class _Task:
    description: str
    total: int | None
    completed: int = 0
    started: float = 0.0


class PlainProgress:
    """One line per task at most every `interval` seconds, e.g. `layers 3/32 (41 s)`: readable in a CI log,
    where a redrawn bar would be thousands of lines of escape codes."""

    def __init__(self, stream, interval: float = 10.0, clock=time.monotonic):
        self.stream, self.interval, self.clock = stream, interval, clock
        self.tasks: list[_Task] = []
        self.last_line = clock()

    def add_task(self, description: str, total: int | None = None) -> int:
        self.tasks.append(_Task(description, total, 0, self.clock()))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: int = 1) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            of = f"/{task.total}" if task.total else ""
            self.stream.write(f"{task.description} {task.completed}{of} ({now - task.started:.0f} s)\n")
            self.stream.flush()


@contextmanager
def progress_reporter(enabled: bool, console: Console):
    """A progress reporter on `console` (stderr), or None when disabled (other torchrun ranks)."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        yield PlainProgress(console.file if console.file is not None else sys.stderr)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress
