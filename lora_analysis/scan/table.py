"""The scan's output table (`.csv`, `.jsonl` or `.parquet`): resumable, never corrupted by a kill.

Rows are written one adapter at a time as a block (its module rows, then its adapter row, or its
one error row), and a block is complete once its last row (`rows.FINAL_ROWS`) is in the file.

- CSV and JSON Lines: each block is appended to the output with one `write` on an `O_APPEND`
  descriptor. A killed run leaves complete blocks and at most one partial one at the end; the
  next run finds the last complete block, cuts the file there and goes on. The file is its own
  journal.
- Parquet cannot be appended to: blocks go to a hidden JSON Lines journal beside the output,
  `.<name>.scan-journal.jsonl`, and at the end the output is written atomically (its earlier
  rows and the journal's) and the journal removed. A run killed before that resumes from the
  journal; one killed between the rename and the removal finds the journal's adapters already
  in the output and skips them.

An existing output is resumed only when it is a scan table (the same columns); anything else is
refused with one line, never written over. One run at a time writes a table: the file (or the
journal) is locked (`flock`), and a second run is refused while the first holds it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import InputFileError, shown
from ..fileio import TEMP_SUFFIX, atomic_path, parse_json
from .discover import FoundAdapter
from .rows import COLUMN_NAMES, COLUMNS, FINAL_ROWS, Row

try:
    import fcntl
except ImportError:  # not POSIX: tables are not locked
    fcntl = None  # type: ignore[assignment]

SUFFIXES = (".csv", ".jsonl", ".parquet")


class ScanOutputError(InputFileError):
    """An output path a scan must not write, or a file that is not a scan table."""


def check_output(path: Path, adapters: Sequence[FoundAdapter]) -> None:
    """Refuse an output that is not .csv/.jsonl/.parquet, whose folder does not exist, or that
    is (or lies inside) one of the adapters read: inputs are never written over."""
    if path.suffix not in SUFFIXES:
        raise ScanOutputError(path, f"unknown table format {path.suffix or '(no suffix)'!r}: use {', '.join(SUFFIXES)}")
    if not path.parent.is_dir():
        raise ScanOutputError(path, f"the folder {shown(path.parent)} does not exist; outputs never create folders")
    targets = [path, journal_path(path)] if path.suffix == ".parquet" else [path]
    for target in targets:
        real = os.path.realpath(target)
        for adapter in adapters:
            source = os.path.realpath(adapter.path)
            inside = adapter.path.is_dir() and real.startswith(source.rstrip(os.sep) + os.sep)
            if real == source or inside or (target.exists() and os.path.samefile(target, adapter.path)):
                raise ScanOutputError(path, f"would write over the input adapter {shown(adapter.path)}; write the table elsewhere")


def journal_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.scan-journal.jsonl")


def open_table(path: str | os.PathLike) -> "ScanTable":
    """The table at `path` (by suffix), created if missing, resumed if it is a scan table."""
    path = Path(path)
    if path.suffix == ".parquet":
        return ParquetTable(path)
    return AppendTable(path, CsvBlocks() if path.suffix == ".csv" else JsonlBlocks())


class ScanTable:
    """Where a scan's blocks go. `done`: the adapters whose block is complete in the table."""

    done: set[str]

    def append(self, rows: Sequence[Row]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "ScanTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Blocks:
    """A text encoding of rows that can be appended to and read back with byte offsets."""

    header = b""

    def encode(self, rows: Sequence[Row]) -> bytes:
        raise NotImplementedError

    def records(self, data: bytes, path: Path) -> Iterator[tuple[Row | None, int]]:
        """(row, end offset) per complete record after the header; (None, offset) once for a
        partial record at the end (a killed write). Raises ScanOutputError if `data` is not a
        scan table."""
        raise NotImplementedError


class CsvBlocks(Blocks):
    """RFC 4180 CSV (`csv` module, "\\n" line ends), a header of `COLUMN_NAMES`; None is empty."""

    header = (",".join(COLUMN_NAMES) + "\n").encode()

    def encode(self, rows: Sequence[Row]) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows([["" if v is None else v for v in row.values()] for row in rows])
        return out.getvalue().encode("utf-8")

    def records(self, data: bytes, path: Path) -> Iterator[tuple[Row | None, int]]:
        if not data:
            return
        lines = _Lines(data)
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError):
            header = None
        if header != COLUMN_NAMES or not lines.ended_line:
            raise ScanOutputError(path, f"exists and is not a scan table (it begins {shown(data[:60])}); refusing "
                                        "to write over it: name a new file, or a scan table to resume")
        try:
            for number, record in enumerate(reader, 2):
                if len(record) != len(COLUMN_NAMES) or not lines.ended_line:
                    if lines.offset < len(data):
                        raise _not_a_table(path, number)
                    break
                yield dict(zip(COLUMN_NAMES, (v or None for v in record))), lines.offset
            else:
                return
        except csv.Error:  # end of data inside a quoted field: a killed write
            pass
        except UnicodeDecodeError:
            if lines.offset < len(data):
                raise _not_a_table(path, lines.number) from None
        yield None, lines.offset


class _Lines:
    """Lines of `data` decoded for `csv.reader`, which pulls exactly one record's lines per
    record: `offset` is then the byte offset just past the last record read."""

    def __init__(self, data: bytes):
        self.lines = iter(data.splitlines(keepends=True))
        self.offset = 0
        self.number = 0
        self.ended_line = True

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.offset += len(line)
        self.number += 1
        self.ended_line = line.endswith(b"\n")
        return line.decode("utf-8")


class JsonlBlocks(Blocks):
    """One strict JSON object per line with exactly the keys `COLUMN_NAMES` (no NaN/Infinity)."""

    def encode(self, rows: Sequence[Row]) -> bytes:
        return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows).encode("utf-8")

    def records(self, data: bytes, path: Path) -> Iterator[tuple[Row | None, int]]:
        offset = 0
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("unterminated line")
                row = parse_json(line, path, "scan table line", ScanOutputError)
            except (ScanOutputError, ValueError):
                if offset + len(line) == len(data):  # the last line: a killed write
                    yield None, offset
                    return
                raise _not_a_table(path, number) from None
            if not isinstance(row, dict) or list(row) != COLUMN_NAMES:
                raise _not_a_table(path, number)
            offset += len(line)
            yield row, offset


def _not_a_table(path: Path, line: int) -> ScanOutputError:
    return ScanOutputError(path, f"exists and is not a scan table (record {line} is not a row of one); refusing to "
                                 "write over it: name a new file, or a scan table to resume")


def _complete_blocks(data: bytes, blocks: Blocks, path: Path) -> tuple[dict[str, list[Row]], int]:
    """({adapter: its rows} for every complete block, byte offset where they end)."""
    complete: dict[str, list[Row]] = {}
    pending: list[Row] = []
    end = len(blocks.header) if data else 0
    for row, offset in blocks.records(data, path):
        if row is None:
            break
        pending.append(row)
        if row["row"] in FINAL_ROWS:
            complete[row["adapter"]] = pending
            pending, end = [], offset
    return complete, end


class AppendTable(ScanTable):
    """A CSV or JSON Lines table appended to in place (see the module docstring)."""

    def __init__(self, path: Path, blocks: Blocks):
        self.path, self.blocks = path, blocks
        self.fd, self.blocks_read = _open_locked(path, blocks)
        self.done = set(self.blocks_read)

    def append(self, rows: Sequence[Row]) -> None:
        data = self.blocks.encode(rows)
        while data:  # one write for a regular file; the loop only guards against a short one
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _open_locked(path: Path, blocks: Blocks) -> tuple[int, dict[str, list[Row]]]:
    """An O_APPEND descriptor on `path` (created with its header if missing), locked, cut after
    its last complete block; and those blocks."""
    if not path.exists():
        _create(path, blocks.header)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise ScanOutputError(path, f"cannot open for writing ({err.strerror or err})") from None
    try:
        _lock(fd, path)
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
        complete, end = _complete_blocks(data, blocks, path)
        if end < len(data):
            os.ftruncate(fd, end)
        if not data:  # an empty file (a user's, holding nothing): give it the header
            os.write(fd, blocks.header)
    except BaseException:
        os.close(fd)
        raise
    return fd, complete


def _create(path: Path, header: bytes) -> None:
    """Create `path` holding `header`, whole or not at all: a temp file linked into place (if
    the name appeared meanwhile, that file is kept). (The `hardening` branch's no-clobber
    `fileio.atomic_write_bytes(..., overwrite=False)` is the same rule; use it once merged.)"""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.write(fd, header)
        os.fsync(fd)
        os.fchmod(fd, 0o644)
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ScanOutputError(path, "another scan is writing this table; wait for it to finish or stop it") from None


class ParquetTable(ScanTable):
    """A Parquet table: blocks to a journal, the output rewritten atomically at `close`."""

    def __init__(self, path: Path):
        self.path = path
        self.pa, self.pq = _pyarrow(path)
        self.previous: list[Row] = []
        if path.exists():
            self.previous = self._read(path)
        self.journal = AppendTable(journal_path(path), JsonlBlocks())
        self.done = {r["adapter"] for r in self.previous if r["row"] in FINAL_ROWS} | self.journal.done

    def _read(self, path: Path) -> list[Row]:
        try:
            table = self.pq.read_table(path)
        except (OSError, self.pa.ArrowException) as err:
            raise ScanOutputError(path, f"exists and is not a readable Parquet file ({shown(err, 120)}); refusing "
                                        "to write over it: name a new file, or a scan table to resume") from None
        if table.column_names != COLUMN_NAMES:
            raise ScanOutputError(path, "exists and is not a scan table (other columns); refusing to write over it: "
                                        "name a new file, or a scan table to resume")
        rows: list[Row] = table.to_pylist()
        return rows

    def append(self, rows: Sequence[Row]) -> None:
        self.journal.append(rows)

    def close(self) -> None:
        if self.journal.fd < 0:
            return
        already = {r["adapter"] for r in self.previous}
        new = [r for adapter, rows in _journal_blocks(self.journal) if adapter not in already for r in rows]
        if new or not self.path.exists():
            schema = self.pa.schema([(name, _ARROW_TYPES[kind](self.pa)) for name, kind in COLUMNS])
            table = self.pa.Table.from_pylist(self.previous + new, schema=schema)
            with atomic_path(self.path) as tmp:
                self.pq.write_table(table, tmp)
        journal = self.journal.path
        self.journal.close()
        journal.unlink(missing_ok=True)


def _journal_blocks(journal: AppendTable) -> Iterator[tuple[str, list[Row]]]:
    """The journal's complete blocks: those it held when opened and those appended since."""
    with open(journal.path, "rb") as f:
        complete, _ = _complete_blocks(f.read(), journal.blocks, journal.path)
    yield from complete.items()


_ARROW_TYPES: dict[Any, Any] = {str: lambda pa: pa.string(), int: lambda pa: pa.int64(), float: lambda pa: pa.float64()}


def _pyarrow(path: Path) -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ScanOutputError(path, "Parquet output needs pyarrow: pip install 'lora-analysis[parquet]' "
                                    "(or write .csv / .jsonl)") from None
    return pyarrow, pyarrow.parquet
