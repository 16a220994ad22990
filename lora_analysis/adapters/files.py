"""Read and write adapter files.

Written (PEFT's layout, so PEFT and the rest of the ecosystem read it):

    out_dir/                       save_adapter(adapter, "out_dir")
        adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r),
                                   base_model.model.<param> (modules_to_save, biases)
        adapter_config.json        PEFT LoraConfig, peft_type "LORA"
    adapter.safetensors            save_adapter(adapter, "adapter.safetensors"): the same tensors alone

The safetensors header metadata holds {"format": "pt", "adapter_config": <the config JSON>} so a
lone file describes itself, and "alpha_unknown": [modules] when some α was unknown.

Read (`load_adapter`, detected from the path and the keys): our files, PEFT directories and lone
files (config in the header, or `adapter_config.json` beside the file), kohya and loralib state
dicts, as safetensors or as `.bin`/`.pt` files that `torch.load(weights_only=True)` accepts.
Nothing is ever unpickled otherwise.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..config import LoraConfig
from ..errors import AdapterFormatError, shown, unpickling_refusal
from ..fileio import atomic_write_bytes, atomic_write_text, parse_json
from ..patterns import PatternError
from .adapter import Adapter, LoraModule
from .layouts import Factors, peft_state_dict, split_state_dict
from .peft_config import config_from_peft_dict, default_and_pattern, peft_config_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
HEADER_CONFIG_KEY = "adapter_config"
HEADER_ALPHA_UNKNOWN_KEY = "alpha_unknown"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> Path:
    """Write `adapter` in PEFT's layout; returns the path written.

    `path` ending in `.safetensors`: one self-describing file. Otherwise a directory holding
    `adapter_model.safetensors` and `adapter_config.json` (created if needed). Per-module r and
    α are written as rank_pattern/alpha_pattern so PEFT rebuilds each module exactly; a local
    absolute `base_model_name_or_path` is reduced to its last component. Each file is written
    atomically.
    """
    path = Path(path)
    config = peft_config_dict(adapter)
    factors = {name: (_portable(m.A), _portable(m.B)) for name, m in adapter.items()}
    tensors = peft_state_dict(factors, {k: _portable(t) for k, t in adapter.extra_tensors.items()})
    metadata = {"format": "pt", HEADER_CONFIG_KEY: json.dumps(config)}
    unknown = [name for name, m in adapter.items() if not m.alpha_known]
    if unknown:
        metadata[HEADER_ALPHA_UNKNOWN_KEY] = json.dumps(unknown)
    data = deterministic_safetensors(tensors, metadata)
    if path.suffix == ".safetensors":
        atomic_write_bytes(path, data)
        return path
    if path.exists() and not path.is_dir():
        raise AdapterFormatError(path, "exists and is not a directory (end the name in .safetensors for one file)")
    atomic_write_bytes(path / WEIGHTS_NAMES[0], data)
    atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return path


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the header's metadata keys sorted.

    safetensors writes `__metadata__` in hash-map order, which changes from run to run; sorting
    it makes equal adapters byte-identical files. Only the order changes, so the header keeps
    its length and no data offset moves.
    """
    data = bytearray(safetensors_bytes(tensors, metadata=metadata))
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canonical) > length:  # never for a reordering; keep the library's own header then
        return bytes(data)
    data[8 : 8 + length] = canonical.ljust(length, b" ")
    return bytes(data)


def _portable(tensor: torch.Tensor) -> torch.Tensor:
    # A private contiguous CPU copy: safetensors refuses views that share memory.
    return tensor.detach().to("cpu", copy=True).contiguous()


def load_adapter(path: str | os.PathLike, alpha: float | None = None) -> Adapter:
    """Read an adapter from a file or a PEFT-style directory; the format is detected.

    Per module: A (r, d_in), B (d_out, r); r from the tensors; α and rsLoRA from the config
    (header, or `adapter_config.json` beside the file / in the directory; rank_pattern and
    alpha_pattern applied), from kohya's `<name>.alpha` (missing: α = r), else unknown.
    `alpha` fills in α where the file records none (loralib, PEFT files without config);
    where it stays unknown the Adapter warns and reports s as unknown.
    fan_in_fan_out comes from the config (PEFT, ours); kohya and loralib store none.

    Raises `AdapterFormatError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFormatError(path, "no such file or directory")
    weights = _weights_file(path) if path.is_dir() else path
    tensors, metadata = _read_tensors(weights)
    split = split_state_dict(tensors, weights)
    config, source_format = None, split.layout
    if split.layout == "peft":
        config, source_format = _peft_config(path, weights, metadata)
    modules = _modules(split, config, alpha, weights)
    for name in _header_list(metadata, HEADER_ALPHA_UNKNOWN_KEY, weights):
        if name in modules:
            modules[name].alpha = alpha
    if config is None:
        config = _config_describing(modules)
    return Adapter(modules, config, split.extra, source=str(path), source_format=source_format)


def _weights_file(directory: Path) -> Path:
    for name in WEIGHTS_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise AdapterFormatError(directory, f"directory holds no {' or '.join(WEIGHTS_NAMES)}")


def _peft_config(path: Path, weights: Path, metadata: dict[str, str]) -> tuple[LoraConfig | None, str]:
    """(config, source format) of a PEFT-layout file. A directory's `adapter_config.json` is
    what PEFT reads, so it wins there; a lone file describes itself in its header, else the
    `adapter_config.json` beside it counts; else there is no config."""
    source_format = "ours" if HEADER_CONFIG_KEY in metadata else "peft"
    beside = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if HEADER_CONFIG_KEY in metadata and not (path.is_dir() and beside.is_file()):
        text, where, what = metadata[HEADER_CONFIG_KEY], weights, "header config"
    elif beside.is_file():
        try:
            text, where, what = beside.read_text(encoding="utf-8"), beside, "adapter config"
        except (OSError, UnicodeDecodeError) as err:
            raise AdapterFormatError(beside, f"cannot read: {err}") from None
    else:
        return None, source_format
    config = parse_json(text, where, what, AdapterFormatError)
    if where == beside:
        check_config_matches_weights(beside, config, weights, metadata)
    return config_from_peft_dict(config, where), source_format


def check_config_matches_weights(config_path: Path, config: object, weights: Path, metadata: dict[str, str]) -> None:
    """Refuse an `adapter_config.json` that is not the config `weights` were saved with.

    `save_adapter` writes a directory's two files as two atomic writes; a crash between them
    leaves new weights beside the old config (read with the old α, σ would be off by their
    ratio). The weights' safetensors header holds a copy of the config they were saved with,
    which links the pair: where it is present the file must equal it (as JSON values). Files
    without that copy (written by PEFT or others) cannot be checked and pass.
    """
    if HEADER_CONFIG_KEY not in metadata:
        return
    recorded = parse_json(metadata[HEADER_CONFIG_KEY], weights, "header config", AdapterFormatError)
    if recorded == config:
        return
    if isinstance(recorded, dict) and isinstance(config, dict):
        keys = sorted(k for k in recorded.keys() | config.keys() if recorded.get(k, ...) != config.get(k, ...))
        differs = f"differs in {shown(', '.join(keys), 80)}"
    else:
        differs = "differs"
    problem = (f"is not the config {weights.name} was saved with ({differs}): the two were not saved together "
               f"(an interrupted save?); save the adapter again, or delete {CONFIG_NAME} to use the config in the weights' header")
    raise AdapterFormatError(config_path, problem)


def _modules(split: Factors, config: LoraConfig | None, alpha: float | None, path: Path) -> dict[str, LoraModule]:
    try:
        return _modules_by_config(split, config, alpha, path)
    except PatternError as err:  # a pattern that cannot be matched against one of the names
        raise AdapterFormatError(path, f"config pattern {err}") from None


def _modules_by_config(split: Factors, config: LoraConfig | None, alpha: float | None, path: Path) -> dict[str, LoraModule]:
    modules = {}
    for name, (A, B) in split.factors.items():
        r = A.shape[0]
        if config is not None and config.rank_for(name) != r:
            problem = f"config gives module {shown(name)} rank {config.rank_for(name)}, its factors have rank {r}"
            raise AdapterFormatError(path, problem)
        module_alpha: float | None
        if split.layout == "kohya":
            module_alpha = split.alphas.get(name, float(r))
        else:
            module_alpha = config.alpha_for(name) if config is not None else None
        modules[name] = LoraModule(
            A=A,
            B=B,
            alpha=alpha if module_alpha is None else module_alpha,
            use_rslora=config is not None and config.use_rslora,
            fan_in_fan_out=config is not None and config.fan_in_fan_out,
        )
    return modules


def _config_describing(modules: dict[str, LoraModule]) -> LoraConfig:
    """A config for files that carry none (kohya, loralib): their modules, ranks and α's."""
    r, rank_pattern = default_and_pattern(None, {}, {n: m.r for n, m in modules.items()})
    alphas = {n: m.alpha for n, m in modules.items() if m.alpha is not None}
    alpha, alpha_pattern = default_and_pattern(None, {}, alphas) if alphas else (None, {})
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors or torch file, and the safetensors header metadata."""
    with open(path, "rb") as f:
        head = f.read(9)
    # torch.save writes a zip archive ("PK"), or a bare pickle (opcode 0x80) in old files; a
    # safetensors header length may start with those bytes too, but its JSON starts at byte 8.
    torch_magic = head[:2] == b"PK" or head[:1] == b"\x80"
    if torch_magic and path.suffix != ".safetensors" and head[8:9] != b"{":
        return _read_torch_file(path), {}
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check the header (length, JSON, data extent) before handing the file to safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AdapterFormatError(path, f"truncated or not an adapter file: {size} bytes")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise AdapterFormatError(path, f"corrupt safetensors header: length {header_len} bytes is implausible")
        if header_len > size - 8:
            problem = f"truncated: the header needs {header_len} bytes, the file has {size - 8} after its length"
            raise AdapterFormatError(path, problem)
        raw = f.read(header_len)
    header = parse_json(raw, path, "safetensors header", AdapterFormatError)
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise AdapterFormatError(path, "corrupt safetensors header: not a JSON object of tensors")
    metadata = header.pop("__metadata__", {})
    try:
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise AdapterFormatError(path, "corrupt safetensors header: a tensor entry lacks valid data_offsets") from None
    if 8 + header_len + data_end > size:
        problem = f"truncated: tensor data needs {8 + header_len + data_end} bytes, the file has {size}"
        raise AdapterFormatError(path, problem)
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(metadata)
    except SafetensorError as err:
        raise AdapterFormatError(path, f"corrupt safetensors file: {err}") from None


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd flat {name: tensor} dict, loaded with `weights_only=True`: a pickle that
    needs anything beyond tensors and containers is refused, never executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        problem = f"refused pickle: torch.load(weights_only=True) rejects it ({unpickling_refusal(err)})"
        raise AdapterFormatError(path, problem) from None
    except Exception as err:  # torch raises RuntimeError/EOFError/... for broken archives
        problem = f"truncated or corrupt torch file ({type(err).__name__}: {shown(str(err).split('. ')[0])})"
        raise AdapterFormatError(path, problem) from None
    flat = isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    if not flat:
        raise AdapterFormatError(path, f"expected a flat dict of named tensors, got {type(state).__name__}")
    return state


def _header_list(metadata: dict[str, str], key: str, path: Path) -> list[str]:
    if key not in metadata:
        return []
    value = parse_json(metadata[key], path, f"header {shown(key)}", AdapterFormatError)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterFormatError(path, f"corrupt header: {shown(key)} must be a list of module names")
    return value
