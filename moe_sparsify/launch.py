"""The `moe-sparsify` console script: signals outside the command's own work.

Importing the command line (torch, transformers) takes seconds. A signal then, with Python's own
handling, printed a KeyboardInterrupt traceback (Ctrl-C), killed the process without a word (SIGTERM,
SIGHUP), or was swallowed inside an object's `__del__` so the run went on. No file is being written
before the command starts, so a signal then ends the process at once with one line and 128 + the
signal; while the command runs, `cli` unwinds signals itself; after it returns, signals are ignored and
the process exits with the command's own code.
"""

from __future__ import annotations

import os
import signal

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_importing = True  # until the command line is imported; then it parses flags, runs the command, returns
_WHEN = {
    True: "while starting; nothing was written",
    False: "outside the command's work; no file was left half-written",
}


def _stopped(signum, frame) -> None:
    os.write(2, f"error: stopped by {signal.Signals(signum).name} {_WHEN[_importing]}\n".encode())
    os._exit(128 + signum)


def main() -> None:
    global _importing
    for sig in _SIGNALS:
        signal.signal(sig, _stopped)
    from .cli import main as run

    _importing = False
    try:
        run()
    finally:
        # The command is over and its files are in place. Tearing the interpreter down takes a moment
        # (freeing torch), with Python's default handlers back: a signal then would only turn the
        # command's exit code into "killed". Ignored (process-wide: blocking would cover this thread
        # only, and torch's threads would take the signal), and left so by Python's finalisation.
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
