"""Resolve module names between an adapter and a model or checkpoint.

Adapters name modules as the model they were trained on did (`bert.encoder.layer.0...` for a
classification model, `encoder.layer.0...` for a bare encoder, `base_model.model.` from PEFT,
`model.` in many decoder checkpoints). `resolve_module_name` finds the one candidate that
names the same module, or fails listing the closest candidates.
"""

from __future__ import annotations

import difflib
from typing import Iterable

from .errors import ModuleResolutionError

KNOWN_PREFIXES = ("base_model.model.", "bert.", "roberta.", "model.", "transformer.")


def strip_known_prefixes(name: str) -> str:
    """Remove leading wrapper prefixes (`base_model.model.`, `bert.`, ...) repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def resolve_module_name(name: str, candidates: Iterable[str], what: str = "model") -> str:
    """The candidate naming the same module as `name`.

    Exact match first; then equality after stripping known prefixes on both sides. Raises
    `ModuleResolutionError` (listing the closest candidates) when nothing or several match.
    """
    candidates = list(candidates)
    if name in candidates:
        return name
    key = strip_known_prefixes(name)
    matches = [c for c in candidates if strip_known_prefixes(c) == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ModuleResolutionError(f"module {name!r} is ambiguous in the {what}: matches {matches[:5]}")
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.0) if candidates else []
    raise ModuleResolutionError(f"module {name!r} not found in the {what}; closest: {close}")
