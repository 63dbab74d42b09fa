"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a profile key, a model name, a data file, a CSV cell.

    The message names the input, the place and what is allowed, on one line.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


class StoreWriteError(UserError):
    """The results store could not be written (disk full, read-only, I/O error). Defined here,
    below both, so the scheduler can stop its runs on it without importing the store."""


def did_you_mean(word: str, allowed: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix when a close match exists, else ""."""
    matches = difflib.get_close_matches(word, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def allowed_list(allowed: Iterable[str]) -> str:
    """Render allowed values for an error message: 'a', 'b' or 'c'."""
    items = [f"'{a}'" for a in allowed]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]
