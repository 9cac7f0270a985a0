"""Errors the CLI turns into one line and an exit code.

UsageError: the user asked for something impossible or malformed (exit 2).
FailedRun: the inputs parsed but the work could not be done (exit 1).
Each message ends with what to do about it.
"""


class MoeSparsifyError(Exception):
    exit_code = 1


class UsageError(MoeSparsifyError):
    exit_code = 2


class FailedRun(MoeSparsifyError):
    exit_code = 1
