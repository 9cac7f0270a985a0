"""Errors the CLI turns into one line and an exit code.

UsageError: the user asked for something impossible or malformed (exit 2): a bad flag or setting, a
  document (settings, plan, thresholds, text) that does not parse or validate, a path of the wrong
  kind, a model, plan or calibration made for another model.
FailedRun: the inputs parsed but the work could not be done (exit 1): a file of the right kind whose
  contents are damaged (checkpoint shards, a calibration directory's tensors), a full disk, a failed
  verification, an interrupted run.
Each message ends with what to do about it.
"""

import os


class MoeSparsifyError(Exception):
    exit_code = 1


class UsageError(MoeSparsifyError):
    exit_code = 2


class FailedRun(MoeSparsifyError):
    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line: library errors often add paragraphs of advice below it."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def stop_if_asked_after(layer: int) -> None:
    """The resume tests' hook: MOE_SPARSIFY_STOP_AFTER_LAYER=k fails a resumable run (prune's journal,
    calibrate's partial directory) right after layer k is recorded, as an interruption would."""
    stop = os.environ.get("MOE_SPARSIFY_STOP_AFTER_LAYER")
    if stop is not None and int(stop) == layer:
        raise FailedRun(f"stopped after layer {layer} (MOE_SPARSIFY_STOP_AFTER_LAYER); rerun to resume")
