"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad config key, a malformed data line, an unknown
model alias). The CLI prints its message and exits with status 2, without a Python traceback.
Anything else is a bug in deltatune and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UserError", "ConfigError", "DataError", "TrainingError", "Interrupted", "nearest"]


class UserError(Exception):
    """An error caused by user input; its message says what is wrong and what to do."""


class ConfigError(UserError):
    """A config key, type or value is wrong."""


class DataError(UserError):
    """A data file or example is malformed, or the data set is unusable."""


class TrainingError(UserError):
    """Training cannot go on (NaN loss, run-directory clash); the message says how to recover."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C/SIGTERM after writing a checkpoint (continue with `resume: true`)."""

    def __init__(self, step: int, checkpoint) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint written to {checkpoint}. Continue with resume: true")
        self.step, self.checkpoint = step, checkpoint


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of `choices` to `word` (for 'did you mean ...?'), or None if nothing is close."""
    choices = list(choices)
    hits = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[hits[0]] if hits else None
