"""Errors the CLI turns into one line and an exit code.

UsageError: the user asked for something impossible or malformed (exit 2): a bad flag or setting, a
  document (settings, plan, thresholds, text) that does not parse or validate, a path of the wrong
  kind, a model, plan or calibration made for another model.
FailedRun: the inputs parsed but the work could not be done (exit 1): a file of the right kind whose
  contents are damaged (checkpoint shards, a calibration directory's tensors), a full disk, a failed
  verification, an interrupted run.
Each message ends with what to do about it.
"""


class MoeSparsifyError(Exception):
    exit_code = 1


class UsageError(MoeSparsifyError):
    exit_code = 2


class FailedRun(MoeSparsifyError):
    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line: library errors often add paragraphs of advice below it."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
