"""What the machine reports about memory: one reader for Linux's /proc files."""

from __future__ import annotations

from pathlib import Path


def proc_bytes(path: str, key: str) -> int | None:
    """A `Key:  N kB` line of a /proc file (/proc/meminfo, /proc/self/status) in bytes; None where absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
