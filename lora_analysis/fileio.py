"""File I/O rules shared by every package: atomic writes, directory locks, strict JSON reading.

Atomic writes: a temp file in the target directory, fsync, then rename. An interrupted run
(SIGINT, SIGKILL, power loss) leaves either the old file or the new one, never a half-written file.
The temp file's name says who owns it, `.<name>.<pid>@<host>.<random>.lora-analysis-tmp`, so
`remove_stale_temp_files` deletes only what a dead process of this program left behind, never a
user's own `.tmp` files nor a live process's write in progress.

Directory locks: `lock_directory` holds an advisory lock (`fcntl.flock`) on a hidden file in a
directory while a run writes there; the kernel releases it when the process ends in any way
(SIGKILL included), so a crashed run never leaves a stale lock. A second run is refused with one
line naming the holder (pid, host, start time, command).

JSON: `read_json` / `parse_json` are the one way a file's JSON is read. Anything that is not
strict RFC 8259 JSON with finite float64-representable numbers (Python's `json` accepts `NaN`,
`Infinity` and turns `1e400` into inf), or is nested too deeply to parse, is refused with one line
naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputFileError, shown

try:
    import fcntl
except ImportError:  # not POSIX (Windows): directories are not locked, with a warning
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".lora-analysis-tmp"
LOCK_NAME = ".lora-analysis.lock"
_OWNED_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_host_tag()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a plain open()'s mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    """This machine's name as it appears in temp-file names (no dots: they separate the parts)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files `atomic_path` left in `directory` when its process was killed
    mid-write: only names it gives, only from this host, only of processes no longer running.
    Returns the paths deleted."""
    removed = []
    for path in Path(directory).glob(".*" + TEMP_SUFFIX):
        owner = _OWNED_TEMP.match(path.name)
        if owner and owner["host"] == _host_tag() and not _process_alive(int(owner["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists under another user / not a valid pid
        return True
    return True


class DirectoryLockedError(InputFileError):
    """Another process holds the directory's lock."""


@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike, what: str = "lora-analysis run") -> Iterator[Path]:
    """Hold an exclusive advisory lock on `directory` (created if missing) for the `with` block.

    `what` names the holder's work for whoever finds the directory locked ("training run").
    Raises `DirectoryLockedError` naming the holder when another process holds it. The lock
    file is removed on a normal exit; after a crash it stays, unlocked, and is reused. A
    directory this call created and that is empty again afterwards is removed too, so a run
    that fails early leaves nothing behind.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputFileError(directory, "exists and is not a directory")
    created = not directory.exists()
    if fcntl is None:
        warnings.warn(f"{directory}: directory locks need fcntl (POSIX); two runs into it are not prevented here", stacklevel=3)
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, directory, what)
    except OSError as err:
        raise InputFileError(directory, f"cannot create or lock the directory ({err.strerror or err})") from None
    try:
        yield directory
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter re-checks the inode (see _acquire)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty, or already gone
                directory.rmdir()


def _acquire(path: Path, directory: Path, what: str) -> int:
    """An fd holding the flock on `path`, its content the holder's description."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096)
            os.close(fd)
            problem = f"in use by {_describe_holder(holder, path)}; wait for it to finish or stop it"
            raise DirectoryLockedError(directory, problem) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the holder removed it between our open and lock: take a fresh one
            break
        os.close(fd)
    description = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(description).encode())
    return fd


def _describe_holder(data: bytes, path: Path) -> str:
    """"another training run (pid 12, on host, started ..., command: ...)" from the lock file."""
    try:
        holder = parse_json(data, path, "lock holder")
        return (f"another {shown(holder['what'], 40)} (pid {int(holder['pid'])} on {shown(holder['host'], 60)}, "
                f"started {shown(holder['started'], 40)}, command: {shown(holder['command'], 120)})")
    except (InputFileError, KeyError, TypeError, ValueError):  # the holder has not written its description yet
        return "another process (not yet recorded who)"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
