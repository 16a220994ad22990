"""Give the memory freed between modules back to the operating system (glibc on Linux).

glibc's malloc raises its mmap threshold to the size of the largest block freed (up to 32 MiB)
and its trim threshold to twice that. So after the first module, each module's working copies
of its factors and Q frames (1–6 MB for a 7B model's modules) come from the heap, and the small
results kept per module (S, metrics), allocated between them, stop the freed blocks from going
back. Measured on the 7B-shaped benchmark adapter (224 modules, benchmarks/README.md), the
process's own memory grew by 30–110 MB over one analysis, differing from run to run.

`HeapTrimmer` calls `malloc_trim(0)` once the process's private resident memory has grown by
`slack` bytes since its last call: the memory freed and kept stays below `slack`, at the cost
of one trim (and the page faults of reusing the returned pages) per `slack` of growth. Where
there is no glibc or no /proc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable

DEFAULT_SLACK = 8 * 2**20


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


MALLOC_TRIM = _malloc_trim()
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def private_resident_bytes() -> int | None:
    """Resident memory not backed by files (RssAnon + RssShmem, from /proc/self/statm), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


class HeapTrimmer:
    """Call after freeing a module's working memory: trims the heap when private memory has grown
    by more than `slack` bytes since the last trim (or since this trimmer was made)."""

    def __init__(self, slack: int = DEFAULT_SLACK):
        self.slack = slack
        self.level = private_resident_bytes()

    def __call__(self) -> None:
        if MALLOC_TRIM is None or self.level is None:
            return
        now = private_resident_bytes()
        if now is not None and now - self.level > self.slack:
            MALLOC_TRIM(0)
            self.level = private_resident_bytes() or now
