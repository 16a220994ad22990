"""File I/O rules shared by every package: atomic writes and strict JSON reading.

Atomic writes: a temp file in the target directory, fsync, then rename. An interrupted run
(SIGINT, SIGKILL, power loss) leaves either the old file or the new one, never a half-written file.

JSON: `read_json` / `parse_json` are the one way a file's JSON is read. Anything that is not
strict RFC 8259 JSON with finite float64-representable numbers (Python's `json` accepts `NaN`,
`Infinity` and turns `1e400` into inf), or is nested too deeply to parse, is refused with one line
naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputFileError, shown


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    overwrite=False: an existing `path` is never replaced, even one that appeared while the
    caller wrote (`InputFileError`); the temp file is published with a no-clobber hard link.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a plain open()'s mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp_path, path)
        else:
            _publish_new(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the finished temp file its name only if nothing has that name (atomic: link(2)
    fails on an existing name); file systems without hard links get a check, then a rename."""
    exists = InputFileError(path, "the file exists (it appeared while this command ran); pass --force to replace it")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError:  # no hard links here (some network and FAT file systems)
        if os.path.lexists(path):
            raise exists from None
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically (see `atomic_path`)."""
    with atomic_path(path, overwrite) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite)


def parse_json(text: str | bytes, path: str | os.PathLike, what: str,
               error: type[InputFileError] = InputFileError) -> Any:
    """`text` parsed as strict JSON; `error(path, "corrupt <what>: ...")` when it is not."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_float_range_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(err, RecursionError) else shown(err)
        raise error(path, f"corrupt {what}: not valid JSON ({reason})") from None


def read_json(path: str | os.PathLike, what: str, error: type[InputFileError] = InputFileError) -> Any:
    """The JSON content of the file at `path` (see `parse_json`); unreadable files are refused too."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise error(path, f"cannot read {what} ({err.strerror or err})") from None
    return parse_json(data, path, what, error)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {shown(text, 40)} is out of float64 range")
    return value


def _float_range_int(text: str) -> int:
    if len(text.lstrip("-")) > 309:  # ≥ 10^309 > the largest float64: no finite float holds it
        raise ValueError(f"integer of {len(text)} digits is out of float64 range")
    value = int(text)
    if abs(value) > 2**1024 - 2**971:  # above float64's max it would become inf
        raise ValueError(f"integer {shown(text, 40)} is out of float64 range")
    return value


def dumps_json(data: Any, **options: Any) -> str:
    """`data` as strict RFC 8259 JSON: a NaN or an infinity raises ValueError instead of becoming
    the bare `NaN` / `Infinity` tokens Python's `json` writes by default. Callers that may hold
    non-finite numbers replace them first (`report.json_ready`)."""
    return json.dumps(data, allow_nan=False, **options)
