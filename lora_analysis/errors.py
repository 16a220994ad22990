"""Exception types. Every error a user can cause is one of these, with a one-line message."""

from __future__ import annotations

import os


class LoraAnalysisError(Exception):
    """Base class: bad input or usage. The CLI prints the message and exits with code 2."""


class AdapterFormatError(LoraAnalysisError):
    """An adapter file that cannot be read: names the file and the problem in one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ModuleResolutionError(LoraAnalysisError):
    """A module name (adapter or base weights) that matches nothing, or matches ambiguously."""
