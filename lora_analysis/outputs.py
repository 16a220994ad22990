"""Where a command may write the files a user names: the one home of the output rules.

Every command that writes a file named on its command line (`analyze -o`, `compare -o` and
`--plot`, and any later command that writes reports or adapters) checks its outputs with
`check_outputs` before its work starts and writes them with `write_output`:

1. An input is never written over: not the file given as input, not a file inside an input
   directory (a PEFT directory's `adapter_model.safetensors` or `adapter_config.json`, a base
   model's shards), whichever way the output names it — a symbolic link, a hard link, `..`.
   `--force` does not lift this rule.
2. An existing file is replaced only with `--force` (`force=True`). Without it the last step of
   the atomic write is a no-clobber link, so a file that appears while the command runs is not
   replaced either.
3. No directory is created: the folder an output goes into must exist. A command that writes
   an adapter directory may create that one directory (`directory=True`), never its parents.
4. Two outputs of one command are two different files.

Each broken rule is an `OutputError`: one line naming the output and the problem (CLI exit 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import InputFileError, LoraAnalysisError, shown
from .fileio import atomic_write_bytes, atomic_write_text

PathLike = str | os.PathLike


class OutputError(InputFileError):
    """An output path that a command must not write (see the module's rules)."""


@dataclass(frozen=True)
class _Inputs:
    """What the outputs must not touch: (device, inode) of every input file and of every file
    directly inside an input directory, and the input directories' real paths."""

    files: dict[tuple[int, int], str]
    directories: list[tuple[str, str]]  # (real path, as the user named it)

    @classmethod
    def of(cls, inputs: Iterable[PathLike | None]) -> "_Inputs":
        files: dict[tuple[int, int], str] = {}
        directories = []
        for given in inputs:
            if given is None or not os.path.exists(given):
                continue  # a missing input is its reader's error, not ours
            name = os.fspath(given)
            if os.path.isdir(given):
                directories.append((os.path.realpath(given), name))
                for entry in _entries(given):
                    files.setdefault(entry, name)
            else:
                files.setdefault(_identity(given), name)
        return cls(files, directories)

    def holding(self, path: PathLike) -> str | None:
        """The input (as the user named it) that `path` is, or lies in; None if none."""
        if os.path.exists(path):
            owner = self.files.get(_identity(path))
            if owner is not None:
                return owner
        real = os.path.realpath(path)
        for directory, name in self.directories:
            if real == directory or real.startswith(directory.rstrip(os.sep) + os.sep):
                return name
        return None


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Iterable[PathLike | None], *,
                  force: bool = False, directories: Iterable[str] = ()) -> None:
    """Refuse, before any work, outputs that break the rules of this module.

    outputs: option name (as the user typed it, "-o", "--plot") → path, None where not given.
    inputs: every file or directory the command reads (None entries are skipped).
    directories: the options whose output is a directory the command creates (an adapter).
    Raises `OutputError` naming the output.
    """
    given = {option: Path(path) for option, path in outputs.items() if path is not None}
    protected = _Inputs.of(inputs)
    seen: dict[str, str] = {}
    for option, path in given.items():
        _check_one(option, path, protected, force, option in set(directories))
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(path, f"{seen[key]} and {option} name the same file; give them different names")
        seen[key] = option


def _check_one(option: str, path: Path, protected: _Inputs, force: bool, directory: bool) -> None:
    owner = protected.holding(path)
    if owner is not None:
        raise OutputError(path, f"{option} would write over the input {shown(owner)} (inputs are never "
                                "written over, --force or not); write the output elsewhere")
    if os.path.lexists(path):
        if directory != os.path.isdir(path):
            wanted = "a directory" if directory else "a file name"
            raise OutputError(path, f"{option} names {'a file' if directory else 'a directory'}; give {wanted}")
        if not force and (not directory or any(os.scandir(path))):
            what = "the directory holds files" if directory else "the file exists"
            raise OutputError(path, f"{option}: {what}; pass --force to replace {'them' if directory else 'it'}")
        return
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(path, f"{option}: the folder {shown(parent)} {what}; outputs never create folders")


def check_results_dir(out: Path, record: Mapping[str, Any], previous: Callable[[Path], Mapping[str, Any] | None],
                      names: Sequence[str], what: str, force: bool = False) -> None:
    """Refuse, before any work starts, to write a results folder (figures, results.json, README)
    over a user's files: the rule `reproduce` and `study` share.

    `out` may be missing, empty, hold none of `names`, or hold a previous `what` being updated:
    `previous(out)` (its record read from its results.json, None when it is not one) equals
    `record` on every key but "quick", and is not a full run that a quick one
    (`record["quick"]`) would replace. `force` writes anyway.
    """
    if out.exists() and not out.is_dir():
        raise LoraAnalysisError(f"{out}: exists and is not a directory")
    if force or not out.exists():
        return
    earlier = previous(out)
    if earlier is not None:
        if record["quick"] and not earlier.get("quick", False):
            raise LoraAnalysisError(f"{out}: holds a full {what}; a --quick run would replace it with a first look "
                                    f"(choose another --out, or --force)")
        for key in record.keys() - {"quick"}:
            if earlier.get(key, record[key]) != record[key]:
                raise LoraAnalysisError(f"{out}: holds a {what} with {key} {earlier[key]!r}, not {record[key]!r} "
                                        f"(choose another --out, or --force)")
        return
    clashes = [name for name in names if (out / name).exists()]
    if clashes:
        raise LoraAnalysisError(
            f"{out}: not the output of a previous {what}, and writing would replace {', '.join(clashes[:4])}"
            f"{', ...' if len(clashes) > 4 else ''} (choose another --out, or --force)")


def write_output(path: PathLike, data: str | bytes, *, force: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path` atomically; an existing file is replaced only with
    `force` (checked again at the final rename: a file that appeared meanwhile is kept)."""
    if isinstance(data, str):
        atomic_write_text(path, data, overwrite=force)
    else:
        atomic_write_bytes(path, data, overwrite=force)


def _identity(path: PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _entries(directory: PathLike) -> Iterable[tuple[int, int]]:
    """Identities of the files directly in `directory` (links followed; unreadable ones skipped)."""
    try:
        entries = list(os.scandir(os.fspath(directory)))
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            continue
        found.append((st.st_dev, st.st_ino))
    return found
