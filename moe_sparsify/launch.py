"""The `moe-sparsify` console script: signals outside the command's own work stop it in one line.

Importing the command line (torch, transformers) takes seconds. A signal then, with Python's own
handling, printed a KeyboardInterrupt traceback (Ctrl-C), killed the process without a word (SIGTERM,
SIGHUP), or was swallowed inside an object's `__del__` so the run went on. No file is being written
before the command starts or after it returns, so a signal then ends the process at once with one line
and 128 + the signal; while the command runs, `cli` unwinds signals itself (and puts these handlers
back when it returns).
"""

from __future__ import annotations

import os
import signal

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stopped(signum, frame) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"error: stopped by {name} while starting or finishing; no file was left half-written\n".encode())
    os._exit(128 + signum)


def main() -> None:
    for sig in _SIGNALS:
        signal.signal(sig, _stopped)
    from .cli import main as run

    run()
