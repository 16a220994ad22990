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


def escaped(text: object) -> str:
    """`text` with every non-printable character (control characters, line breaks, terminal
    escapes, bidirectional overrides) written as `repr` writes it, without the quotes: what
    reports print for names taken from files, complete but unable to forge lines or colours."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` safe for a one-line message: `escaped`, then cut to `limit` characters with an
    ellipsis saying how much was left out."""
    text = escaped(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def unpickling_refusal(err: BaseException) -> str:
    """The one useful line of torch's long `weights_only` error ("Unsupported global: GLOBAL
    builtins.print"), never its advice to load with `weights_only=False` (that runs the file's
    code)."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return shown(line.split("WeightsUnpickler error:", 1)[1].split(" was not")[0].strip())
    return type(err).__name__
