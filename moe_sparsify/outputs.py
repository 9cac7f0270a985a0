"""Where results land: pre-flight checks, one exclusive lock per output, atomic replacement, no litter.

Every command that writes calls `check_output` before it loads a model, then holds `OutputLock`
for the whole run. Files and directories are built under a temporary name beside the target,
`.NAME.partial-PID`, and renamed into place; the temporary goes on every exit path (errors and
SIGTERM included, see `cli.py`), and one left by a killed process is removed by the next run that
takes the lock on the same output.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import glob
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path

import yaml

from .errors import FailedRun, MoeSparsifyError, UsageError, first_line

_PARTIAL = ".partial-"
_PROBE = ".probe-"  # the pre-flight's test file: not a temporary that holds work (tests wait for those)


def _temporary(path: Path, marker: str = _PARTIAL) -> Path:
    return path.with_name(f".{path.name}{marker}{os.getpid()}")


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _remove(path: Path) -> None:
    """A file, link or directory tree, whichever `path` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_failure(code: int | None, path: Path, detail: str = "") -> MoeSparsifyError:
    """One line for an operating-system error while writing `path`."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return FailedRun(f"no space left on the disk holding {path}; free some space or choose another --output")
    if code == errno.EROFS:
        return UsageError(f"{path} is on a read-only file system; choose another --output")
    if code in (errno.EACCES, errno.EPERM):
        return UsageError(f"no permission to write {path}; fix its permissions or choose another --output")
    return FailedRun(f"cannot write {path}: {detail or os.strerror(code or 0)}; check the disk and --output")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn OS errors (and safetensors' `... (os error 28)`) raised while writing `path` into one line."""
    try:
        yield
    except OSError as exc:
        raise write_failure(exc.errno, path, exc.strerror or str(exc)) from None
    except Exception as exc:  # SafetensorError carries the OS error only in its text
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        raise write_failure(int(found[1]), path, first_line(exc)) from None


def _size(n: int) -> str:
    """Bytes in the largest unit that shows them as at least 1 (0.00 GiB told a user nothing)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def check_output(
    path: Path,
    kind: str,
    overwrite: bool,
    needed_bytes: int = 0,
    flag: str = "--output",
    inputs: tuple[Path, ...] = (),
) -> None:
    """Refuse, before any heavy work, an output that cannot be written.

    kind: "file" or "directory", what the command writes. An existing output of the other kind is
    refused even with --overwrite (replacing a directory by a plan file is never what was meant).
    needed_bytes: a lower bound of the output's size, checked against the free space.
    inputs: what the run reads (the model directory, a plan, calibration files and directories). An
    output that is one of them, or holds one, or holds the working directory, would be deleted by
    --overwrite, and is refused. Inside an input directory, a new file is fine (a threshold file
    beside an exported model, where `MODEL+skip` finds it), and so is replacing a plan or threshold
    file; a directory (a report mixed into a checkpoint) or any other existing file (a model's
    config.json replaced by a plan) is refused.
    """
    path = Path(path)
    target = path.resolve()
    for kept in (Path.cwd(), *inputs):
        kept = Path(kept).resolve()
        if target == kept and kept != Path.cwd().resolve():
            raise UsageError(f"{flag} {path} is one of the inputs this run reads; choose a new path")
        if target == kept or target in kept.parents:
            raise UsageError(f"{flag} {path} is or holds {kept}, which this run must not replace; choose a new path")
    for source in inputs:
        source = Path(source).resolve()
        if source in target.parents and (kind == "directory" or (path.exists() and not _replaceable(path))):
            raise UsageError(f"{flag} {path} is inside {source}, which this run reads; choose a path outside it")
    parent = path.absolute().parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{flag} {path}: {parent} {what}; create it or choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {parent} (read-only or no permission); choose another {flag}")
    _check_name_fits(path, flag)
    _check_creatable(path, flag)
    if path.is_symlink() and not path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} is a broken symbolic link; remove it, pass --overwrite or choose another")
    if path.exists():
        if not (path.is_dir() or path.is_file()):  # replacing /dev/null or a FIFO by a plan is never meant
            raise UsageError(
                f"{flag} {path} is a FIFO, socket or device, not a file or directory; choose another {flag}"
            )
        found = "directory" if path.is_dir() else "file"
        if found != kind:
            raise UsageError(f"{flag} {path} is a {found}, but this writes a {kind}; choose another {flag}")
        if not overwrite:
            raise UsageError(f"{path} exists; pass --overwrite or choose another {flag}")
    check_free_space(path, needed_bytes, flag)


def _siblings(path: Path) -> tuple[str, ...]:
    """The names a run makes beside its output: the temporary, the lock and prune's resume journal."""
    return (_temporary(path).name, _lock_file(path).name, f"{path.name}.progress.json")


def _check_name_fits(path: Path, flag: str) -> None:
    """A name the file system takes, with room for the longer names made beside it: an output named
    near the limit would otherwise fail at its first temporary, after the model loaded."""
    parent = path.absolute().parent
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    longest = max(len(os.fsencode(name)) for name in _siblings(path))
    if longest > limit:
        room = limit - (longest - len(os.fsencode(path.name)))
        raise UsageError(
            f"{flag} {path}: the name is {len(os.fsencode(path.name))} bytes, and its file system takes names of "
            f"at most {limit}, {room} with the temporary files made beside it; choose a shorter name"
        )


def creation_error(probe: Path) -> OSError | None:
    """Create and remove the file `probe`, signals waiting meanwhile; the error if that failed."""
    try:
        with _termination_deferred():
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
    except FileExistsError:  # this very process's: creating works
        return None
    except OSError as exc:
        return exc
    return None


def _check_creatable(path: Path, flag: str) -> None:
    """Create and remove a file beside the output: access() trusts permission bits that root ignores and
    file systems (/proc, /sys, a read-only mount) that refuse new files anyway. Signals wait meanwhile;
    a probe left by SIGKILL is removed, like a stale temporary, by the next run on this output."""
    exc = creation_error(_temporary(path, _PROBE))
    if exc is not None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise write_failure(exc.errno, path) from None
        parent = path.absolute().parent
        raise UsageError(
            f"{flag} {path}: cannot create files in {parent} ({exc.strerror or exc}); choose another {flag}"
        ) from None


def check_free_space(path: Path, needed_bytes: int, flag: str = "--output") -> None:
    """Refuse an output of at least `needed_bytes` where the disk holding it has less free."""
    parent = Path(path).absolute().parent
    if needed_bytes > 0:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise FailedRun(
                f"{flag} {path} needs at least {_size(needed_bytes)}, and {parent} has {_size(free)} free; "
                f"free some space or choose another {flag}"
            )


# Documents a run writes beside a model and may replace there (a re-profiled threshold file).
_REPLACEABLE_KINDS = ("moe-sparsify-plan", "moe-sparsify-thresholds")


def _replaceable(path: Path) -> bool:
    """Whether `path` is a plan or threshold file (YAML or JSON, which YAML reads too); a weights file is
    not read to find out."""
    try:
        if path.suffix not in (".json", ".yaml", ".yml") or path.stat().st_size > 2**24:
            return False
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # a binary file: UnicodeDecodeError is a ValueError
        return False
    return isinstance(data, dict) and data.get("kind") in _REPLACEABLE_KINDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def owner_gone(pid: str) -> bool:
    """A leftover's owner, the PID written in its name: another process that no longer runs here."""
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` (and pre-flight probes, `.NAME.probe-PID`) left beside `path` by
    processes that are gone; returns what went."""
    path = Path(path)
    removed = []
    for marker in (_PARTIAL, _PROBE):
        for candidate in path.parent.glob(f".{glob.escape(path.name)}{marker}*"):
            pid = candidate.name.rpartition(marker)[2]
            if owner_gone(pid):
                _remove(candidate)
                removed.append(candidate)
    return removed


class OutputLock:
    """An exclusive lock on one output for a whole run: `.NAME.lock` beside it, held with flock, holding
    the PID. The kernel drops a flock when its process dies, however it dies, so a lock left by a killed
    run is stale by construction and the next run takes it over. Taking it also sweeps the temporaries
    of dead runs on the same output."""

    def __init__(self, path: Path):
        self.output = Path(path)
        self.path = _lock_file(self.output)
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            with writing(self.output):  # the user knows the output, not the lock beside it
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FailedRun(
                    f"another moe-sparsify run (PID {holder}) is writing {self.output}; "
                    "wait for it to finish or choose another --output"
                ) from None
            # A holder that just finished unlinked the file we opened; lock the current one instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        remove_stale_temporaries(self.output)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


_held: ContextVar[ExitStack | None] = ContextVar("held_outputs", default=None)


def holding_outputs(fn):
    """For a command function: the outputs it locks with `lock_output` stay locked until it returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ExitStack() as stack:
            token = _held.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _held.reset(token)

    return wrapper


@contextmanager
def _termination_deferred() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT wait (pending, not lost) inside: one arriving between creating the lock
    file and registering its removal would otherwise leave the file behind."""
    held = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending signal is delivered here


def lock_output(path: Path) -> None:
    """Lock `path` until the enclosing `holding_outputs` command returns."""
    stack = _held.get()
    if stack is None:
        raise RuntimeError("lock_output is called from a function decorated with holding_outputs")
    with _termination_deferred():
        stack.enter_context(OutputLock(path))


@contextmanager
def replacing(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path` to build a file or directory in; on success it replaces
    `path` (a file or a directory) by rename, so readers never see half an output. The temporary is
    removed on every exit path."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite or choose another --output")
    tmp = _temporary(path)
    _remove(tmp)
    try:
        yield tmp
        with writing(path):
            move_into_place(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def move_into_place(built: Path, path: Path) -> None:
    """Rename `built` to `path`, replacing what is there (a file or a directory)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    built.replace(path)


def write_atomically(path: Path, data: str | bytes, overwrite: bool = True) -> Path:
    """Write beside the target and rename, so readers never see half a file."""
    with replacing(path, overwrite) as tmp, writing(path):
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)
