"""Tensor files under the readers: read tensors on demand, with bounded work before any is read.

    SafetensorsFile   safetensors; the header is checked first: length ≤ 100 MB (safetensors'
                      own limit), at most MAX_TENSORS entries (counted before the JSON is
                      parsed), strict JSON, every entry's dtype, shape and data extent inside
                      the file. Each tensor is then read with one `readinto` into its own
                      buffer, not through a memory map: a mapping keeps every page it has
                      touched in the process's resident set until it is closed, so reading a
                      1.6 GB adapter module by module would end with all of it resident.
    TorchFile         `torch.save` files, unpickled only by `torch.load(weights_only=True)`,
                      memory-mapped (`mmap=True`) so tensors are paged in when read. A zip
                      member that is compressed is refused before loading (torch.save never
                      compresses; a deflated member can expand without bound: a 2.7 MB zip
                      can hold an 8.4 GB tensor), and so are members extending past the file.

Both answer `keys()`, `shape(key)`, `dtype(key)` from the header / the pickle's metadata, and
`get(key)` reads one tensor: float8 tensors (F8_E4M3, F8_E5M2) are upcast to float32 exactly;
float4 (F4), which torch cannot convert, is refused with one line. `meta(key)` is a tensor on
the "meta" device with the right shape and dtype: readers build and check an adapter's
structure from those without reading any data.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import sys
import threading
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import torch

from ..errors import AdapterFormatError, shown
from ..fileio import parse_json

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_TENSORS = 500_000  # far above any adapter (a 64-expert MoE LoRA on every layer has ~100k)
SAFETENSORS_DTYPES: dict[str, torch.dtype | None] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F4": None,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
UPCAST = {torch.float8_e4m3fn, torch.float8_e5m2, getattr(torch, "float8_e4m3fnuz", None), getattr(torch, "float8_e5m2fnuz", None)}


def upcast(tensor: torch.Tensor, path: Path, key: str) -> torch.Tensor:
    """float8 → float32 (exact); float4 refused; other dtypes unchanged."""
    if tensor.dtype in UPCAST:
        return tensor.to(torch.float32)
    if "float4" in str(tensor.dtype):
        raise AdapterFormatError(path, f"tensor {shown(key)!r} is {tensor.dtype} (F4): torch cannot convert it to a wider float")
    return tensor


class TensorFile:
    """Common interface of `SafetensorsFile` and `TorchFile` (see the module docstring)."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def meta(self, key: str) -> torch.Tensor:
        """An empty tensor of the key's shape and dtype on the meta device (no data read)."""
        dtype = self.dtype(key)
        return torch.empty(self.shape(key), dtype=torch.float32 if dtype in UPCAST else dtype, device="meta")


class SafetensorsFile(TensorFile):
    """A safetensors file, header checked up front, each tensor read on demand into its own
    buffer. Reads go through the one file handle the header was read from, so a file replaced
    on disk meanwhile is never mixed into the tensors of the one whose header was checked."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with this object
        weakref.finalize(self, self._file.close)
        self._lock = threading.Lock()  # one seek + read at a time
        self._entries, self.metadata, self._data_start = read_safetensors_header(path, self._file)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        dtype = self._entries[key].dtype
        if dtype is None:
            raise AdapterFormatError(self.path, f"tensor {shown(key)!r} is F4 (float4): torch cannot convert it to a wider float")
        return dtype

    def get(self, key: str) -> torch.Tensor:
        dtype = self.dtype(key)  # F4 refused before reading
        entry = self._entries[key]
        data = torch.empty(entry.end - entry.start, dtype=torch.uint8)
        with self._lock:
            self._file.seek(self._data_start + entry.start)
            buffer, done = data.numpy().data, 0
            while done < len(buffer):  # a raw read may return less than asked
                read = self._file.readinto(buffer[done:])
                if not read:
                    raise AdapterFormatError(self.path, f"truncated while reading tensor {shown(key)!r}: the file shrank after it was opened")
                done += read
        return upcast(from_little_endian(data, dtype).reshape(entry.shape), self.path, key)


def from_little_endian(data: torch.Tensor, dtype: torch.dtype, host_byteorder: str = sys.byteorder) -> torch.Tensor:
    """The flat tensor of `dtype` whose little-endian bytes (safetensors' order) are `data`
    (uint8, contiguous); on a big-endian host each element's bytes are reversed first."""
    size = torch.empty(0, dtype=dtype).element_size()
    if host_byteorder != "little" and size > 1:
        data = data.view(-1, size).flip(1).contiguous().view(-1)
    return data.view(dtype) if data.numel() else torch.empty(0, dtype=dtype)


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype (None for F4), shape, and its bytes
    start..end counted from the end of the header."""

    dtype: torch.dtype | None
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path, file: BinaryIO) -> tuple[dict[str, HeaderEntry], dict[str, str], int]:
    """({key: entry}, metadata, offset of the tensor data) of the safetensors file `path`, open
    as `file`, checked without reading tensor data.

    Bounded work: the header length is checked against the file and MAX_HEADER_BYTES, and the
    number of entries is counted in the raw bytes (MAX_TENSORS) before any JSON is parsed.
    """
    size = os.fstat(file.fileno()).st_size
    file.seek(0)
    prefix = file.read(8)
    if len(prefix) < 8:
        raise AdapterFormatError(path, f"truncated or not an adapter file: {size} bytes")
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES:
        raise AdapterFormatError(path, f"corrupt safetensors header: length {header_len} bytes is implausible")
    if header_len > size - 8:
        problem = f"truncated: the header needs {header_len} bytes, the file has {size - 8} after its length"
        raise AdapterFormatError(path, problem)
    raw = file.read(header_len)
    if len(raw) < header_len:
        raise AdapterFormatError(path, "truncated while reading the header: the file shrank after it was opened")
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise AdapterFormatError(path, f"safetensors header lists {entries} tensors, more than the {MAX_TENSORS} an adapter may hold")
    header = parse_json(raw, path, "safetensors header", AdapterFormatError)
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise AdapterFormatError(path, "corrupt safetensors header: not a JSON object of tensors")
    metadata = header.pop("__metadata__", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterFormatError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    data_size = size - 8 - header_len
    checked = {}
    for key, entry in header.items():
        checked[key] = _header_entry(path, key, entry, data_size)
    return checked, dict(metadata), 8 + header_len


def _header_entry(path: Path, key: str, entry: Any, data_size: int) -> HeaderEntry:
    try:
        dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(start, int) and isinstance(end, int)):
            raise TypeError
    except (TypeError, KeyError, ValueError):
        raise AdapterFormatError(path, f"corrupt safetensors header: tensor {shown(key)!r} lacks a valid dtype, shape or data_offsets") from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise AdapterFormatError(path, f"tensor {shown(key)!r} has dtype {shown(dtype_name)!r}, which is not read")
    if not 0 <= start <= end <= data_size:
        raise AdapterFormatError(path, f"truncated: tensor {shown(key)!r} needs bytes {start}..{end} of {data_size}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    bits = 4 if dtype is None else torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits if dtype != torch.bool else 8
    if (end - start) * 8 != math.prod(shape) * bits:
        raise AdapterFormatError(path, f"corrupt safetensors header: tensor {shown(key)!r} of shape {shape} does not fill bytes {start}..{end}")
    return HeaderEntry(dtype, tuple(shape), start, end)


class TorchFile(TensorFile):
    """A `torch.save` file, unpickled with `weights_only=True` and memory-mapped.

    A flat {name: tensor} dict is read as is; a nested one (LitGPT's {"model": {...}}) only
    once its reader names the dict holding the tensors (`use_root`)."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self.tree = load_torch_file(path)
        self.root: tuple[str, ...] | None = () if _is_flat(self.tree) else None
        self._tensors: dict[str, torch.Tensor] = self.tree if self.root == () else {}

    def holds_flat_dict_at(self, root: tuple[str, ...]) -> bool:
        node: Any = self.tree
        for part in root:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return _is_flat(node)

    def use_root(self, root: tuple[str, ...]) -> None:
        """Read the tensors from the flat dict at `root` (e.g. ("model",))."""
        if not self.holds_flat_dict_at(root):
            raise AdapterFormatError(self.path, f"expected a flat dict of named tensors under {'/'.join(root)!r}")
        node: Any = self.tree
        for part in root:
            node = node[part]
        self.root, self._tensors = root, node

    def keys(self) -> list[str]:
        if self.root is None:
            raise AdapterFormatError(self.path, f"expected a flat dict of named tensors, got {_describe(self.tree)}")
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return upcast(self._tensors[key], self.path, key)  # mapped: pages are read when used


def _is_flat(node: Any) -> bool:
    return isinstance(node, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in node.items())


def _describe(node: Any) -> str:
    if isinstance(node, dict):
        bad = next(((k, v) for k, v in node.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            return f"a dict whose entry {shown(bad[0])!r} is a {type(bad[1]).__name__}"
    return type(node).__name__


def load_torch_file(path: Path) -> Any:
    """torch.load(weights_only=True, mmap=True) after checking the zip container is bounded.

    A pickle that needs anything beyond tensors and containers is refused, never executed.
    """
    if zipfile.is_zipfile(path):
        _check_zip(path)
        mmap = True
    else:
        mmap = False  # legacy (pre-1.6) format: no mmap; its data is stored raw, bounded by the file
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        problem = f"refused pickle: torch.load(weights_only=True) rejects it ({_unpickler_reason(err)})"
        raise AdapterFormatError(path, problem) from None
    except Exception as err:  # noqa: BLE001 — torch raises RuntimeError/EOFError/... for broken archives
        problem = f"truncated or corrupt torch file ({type(err).__name__}: {shown(str(err).split('. ')[0])})"
        raise AdapterFormatError(path, problem) from None


def _check_zip(path: Path) -> None:
    """Every member stored (not compressed) and inside the file: the archive cannot expand."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
        raise AdapterFormatError(path, f"truncated or corrupt torch file (zip: {shown(err)})") from None
    if len(members) > MAX_TENSORS:
        raise AdapterFormatError(path, f"torch file holds {len(members)} archive members, more than {MAX_TENSORS}")
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise AdapterFormatError(
                path, f"archive member {shown(member.filename)!r} is compressed ({member.file_size} bytes from "
                      f"{member.compress_size}): torch.save never compresses; refused, it could expand without bound")
        if member.header_offset + member.file_size > size or member.file_size != member.compress_size:
            raise AdapterFormatError(path, f"truncated or corrupt torch file: member {shown(member.filename)!r} extends past the file")


def _unpickler_reason(err: Exception) -> str:
    """The one useful line of torch's long weights_only error ("Unsupported global: GLOBAL io.open ...")."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return shown(line.split("WeightsUnpickler error:", 1)[1].split(" was not")[0].strip())
    return type(err).__name__


def open_tensor_file(path: Path) -> TensorFile:
    """A safetensors or torch file, told apart by content, not by name: torch.save writes a zip
    archive ("PK") or, in old files, a bare pickle (opcode 0x80); a safetensors header length
    may start with those bytes too, but its JSON starts at byte 8."""
    if not path.is_file():
        raise AdapterFormatError(path, "no such file" if not path.exists() else "not a regular file")
    with open(path, "rb") as f:
        head = f.read(9)
    torch_magic = head[:2] == b"PK" or head[:1] == b"\x80"
    if torch_magic and path.suffix != ".safetensors" and head[8:9] != b"{":
        return TorchFile(path)
    return SafetensorsFile(path)


class LazyTensors(Mapping[str, torch.Tensor]):
    """{name: tensor} read from a tensor file on access (extra tensors of an adapter)."""

    def __init__(self, source: TensorFile, keys: Mapping[str, str]):
        self._source, self._keys = source, dict(keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._source.get(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

