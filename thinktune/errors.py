"""The exceptions the CLI turns into one line: `UserError` ("the user gave us something we can't use")
and `TrainingStopped` (training ended early on purpose, with a valid checkpoint).

Every stage raises `UserError` with a single line that names the file, row or key
and says what to do. The CLI prints that line and exits with code 2 (no traceback
unless `--debug`). Anything else that escapes is a bug and keeps its traceback.
This module imports nothing from the package.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input: a one-line message for the user, exit code 2."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training ended early on purpose (bad steps, out of memory); a checkpoint is valid.

    `exit_code` is what the CLI returns.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
