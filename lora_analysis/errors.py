"""Exception types, and how untrusted text appears in messages.

Every error a user can cause is a `LoraAnalysisError` with a one-line message; the CLI prints it
and exits with code 2. Names taken from files (module names, tensor keys, config keys) reach
messages only through `shown`, which escapes control characters (a newline or a terminal escape
sequence in a key must not forge output) and truncates (a 10 kB key must not make a 10 kB line).
"""

from __future__ import annotations

import os

MAX_SHOWN_CHARS = 120


class LoraAnalysisError(Exception):
    """Base class: bad input or usage. The CLI prints the message and exits with code 2."""


class InputFileError(LoraAnalysisError):
    """A file that cannot be used as given: names the file and the problem in one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{shown(self.path)}: {problem}" if self.path else problem)


class AdapterFormatError(InputFileError):
    """An adapter file that cannot be read."""


class ModuleResolutionError(LoraAnalysisError):
    """A module name (adapter or base weights) that matches nothing, or matches ambiguously."""


def shown(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` safe for a one-line message: control characters escaped (as `repr` does, without
    the quotes), cut to `limit` characters with an ellipsis saying how much was left out."""
    text = str(text)
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}… ({len(escaped) - limit} more characters)"
