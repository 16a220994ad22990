"""Which adapters a scan reads: discovery under a root, and deterministic shards of them.

An adapter is a directory holding one of the weight files `load_adapter` looks for in a
directory (`adapters.files.WEIGHTS_NAMES`: PEFT's `adapter_model.safetensors`, ...), or a
tensor file (`TENSOR_SUFFIXES`) outside such a directory. The files of an adapter directory
belong to it (a PEFT directory's `training_args.bin` is not a second adapter); its
subdirectories are searched on (PEFT keeps named adapters in subdirectories). Hidden names
(`.git`, `.cache`, our temp files) are skipped, and symbolic links to directories are not
followed (no cycles). Whether a candidate really is an adapter is the reader's call: one that
is not becomes an error row of the scan.

Adapters are named by their path relative to the root (POSIX separators), so the rows of a scan
do not depend on where the tree is mounted, and shards run on different machines agree.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters.files import WEIGHTS_NAMES
from ..errors import InputFileError, LoraAnalysisError

TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class FoundAdapter:
    """One adapter to scan: `name` its path relative to the scan root ("." for the root
    itself), `path` where to read it."""

    name: str
    path: Path


def find_adapters(root: str | os.PathLike) -> list[FoundAdapter]:
    """Every adapter under `root` (a directory, or one adapter file), sorted by name."""
    root = Path(root)
    if not root.exists():
        raise InputFileError(root, "no such file or directory")
    if not root.is_dir():
        return [FoundAdapter(root.name, root)]
    found = []
    for directory, subdirectories, files in os.walk(root, onerror=_raise):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        here = Path(directory)
        if any(name in files for name in WEIGHTS_NAMES):
            found.append(FoundAdapter(_relative(here, root), here))
            continue
        for name in sorted(files):
            if not name.startswith(".") and name.endswith(TENSOR_SUFFIXES) and (here / name).is_file():
                found.append(FoundAdapter(_relative(here / name, root), here / name))
    return sorted(found, key=lambda a: a.name)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() or "."


def _raise(err: OSError) -> None:
    raise InputFileError(err.filename, f"cannot list the directory ({err.strerror or err})")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 ≤ index < count): the adapters whose name hashes to `index`
    (SHA-256 of the UTF-8 name, mod count). The shards of one tree are disjoint, cover it, and
    keep their adapters when others are added; every machine computes the same split."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """"i/n" → Shard(i, n); a one-line error otherwise."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise LoraAnalysisError(f"shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4 (Slurm: "
                                    "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)")
        return cls(int(match[1]), int(match[2]))

    def holds(self, name: str) -> bool:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
