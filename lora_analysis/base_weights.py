"""Lazy access to pretrained weights W by module name, one module at a time.

Sources: a built-in model name (`minilm`), a Hugging Face model directory (`model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` loaded with
weights_only), a single `.safetensors` / `.bin` / `.pt` file, or an in-memory `nn.Module`
(LoRA-wrapped layers give their frozen base weight). `recorded_base` finds an adapter's own
base model from its `base_model_name_or_path` when that names a built-in or a local directory. Adapter module names are resolved against the checkpoint's with
`naming.resolve_module_name` (`base_model.model.`, `bert.`, `model.` prefixes, ...).

W is returned as (d_out, d_in), the `nn.Linear` orientation: GPT-2's Conv1D stores (d_in, d_out)
and is transposed. For a file, the orientation of a non-square weight follows from its shape and
the adapter module's (d_out, d_in); a square one follows the module's `fan_in_fan_out`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .adapters import Adapter, LoraModule
from .assets import BUILTIN_MODELS, asset_path
from .errors import InputFileError, LoraAnalysisError
from .fileio import read_json
from .lora import LoraLinear, is_conv1d
from .naming import resolve_module_name

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class BaseWeights:
    """Pretrained 2-D weights by module name (`encoder.layer.0.attention.self.query`).

    Args:
        source: built-in model name (`minilm`), model directory, weights file, or `nn.Module`.
        dtype, device: of the returned weights (float32 on the CPU by default; bf16/fp16
            checkpoints are upcast).
    """

    def __init__(self, source: str | os.PathLike | nn.Module, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dtype, self.device = dtype, torch.device(device)
        self._modules: dict[str, nn.Module] = {}
        self._files: dict[str, Path] = {}  # module name → file holding `<name>.weight`
        self._shapes: dict[str, tuple[int, ...]] = {}  # stored shapes
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        if isinstance(source, nn.Module):
            self.source = f"in-memory {type(source).__name__}"
            self._index_module(source)
        else:
            self.source = str(source)
            self._index_files(_weight_files(model_path(source)))
        if not self._shapes:
            raise LoraAnalysisError(f"{self.source}: no 2-D weights found")

    @property
    def names(self) -> list[str]:
        """Module names that have a 2-D `weight`, in checkpoint order."""
        return list(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except LoraAnalysisError:
            return False
        return True

    def resolve(self, name: str) -> str:
        """The checkpoint's name for adapter module `name`; `ModuleResolutionError` lists the closest."""
        return resolve_module_name(name, self._shapes, what=f"base weights {self.source}")

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self.resolve(name)]

    def weight(self, name: str, module: LoraModule | None = None) -> torch.Tensor:
        """W for adapter module `name`, (d_out, d_in).

        With `module`, W is oriented and checked against its (d_out, d_in); without it, file
        weights come as stored and in-memory Conv1D weights are transposed.
        """
        key = self.resolve(name)
        stored = self._read(key)
        if not torch.is_floating_point(stored) or not torch.isfinite(stored).all():
            raise LoraAnalysisError(f"{self.source}: weight {key!r} is not finite floating point")
        transpose = self._is_transposed(key, stored.shape, module)
        W = stored.T if transpose else stored
        return W.to(device=self.device, dtype=self.dtype).contiguous()

    def _is_transposed(self, key: str, shape: torch.Size, module: LoraModule | None) -> bool:
        if key in self._modules:
            transposed = is_conv1d(self._modules[key])
        elif module is None:
            return False
        else:
            transposed = module.fan_in_fan_out
        if module is None:
            return transposed
        expected, reverse = (module.d_out, module.d_in), (module.d_in, module.d_out)
        if expected != reverse:  # non-square: the shape decides
            if tuple(shape) == expected:
                return False
            if tuple(shape) == reverse:
                return True
        elif tuple(shape) == expected:
            return transposed
        raise LoraAnalysisError(
            f"{self.source}: weight {key!r} has shape {tuple(shape)}, but the adapter module is "
            f"(d_out, d_in) = {expected}"
        )

    def _read(self, key: str) -> torch.Tensor:
        if key in self._modules:
            return self._modules[key].weight.detach()
        path = self._files[key]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(f"{key}.weight")
        return self._bin(path)[f"{key}.weight"]

    def _index_module(self, model: nn.Module) -> None:
        wrapped_bases = {f"{name}.base" for name, m in model.named_modules() if isinstance(m, LoraLinear)}
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                if module.merged:
                    raise LoraAnalysisError(f"{self.source}: LoRA layer {name!r} is merged, so its weight is W + ΔW; unmerge it first")
                module = module.base
            elif name in wrapped_bases:
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2:
                self._modules[name] = module
                self._shapes[name] = tuple(weight.shape)

    def _index_files(self, files: list[Path]) -> None:
        for path in files:
            for key, shape in self._stored_shapes(path).items():
                if key.endswith(".weight") and len(shape) == 2:
                    name = key[: -len(".weight")]
                    self._files[name], self._shapes[name] = path, shape

    def _stored_shapes(self, path: Path) -> dict[str, tuple[int, ...]]:
        """{tensor key: shape} without reading tensor data."""
        if path.suffix != ".safetensors":
            return {key: tuple(t.shape) for key, t in self._bin(path).items() if isinstance(t, torch.Tensor)}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as e:  # noqa: BLE001 — safetensors raises several types for bad files
            raise LoraAnalysisError(f"{path}: cannot read safetensors header ({e})") from None

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            try:  # mmap: tensors are paged in when read, not all at load time
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 — any unpickling failure is a bad file
                raise LoraAnalysisError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from None
            if not isinstance(state, dict):
                raise LoraAnalysisError(f"{path}: not a state dict (got {type(state).__name__})")
            self._bin_cache[path] = state
        return self._bin_cache[path]


def model_path(source: str | os.PathLike) -> Path:
    """The local path behind a base-model source: a built-in name's installed directory (built-in
    names win over a same-named local path, as in training), else the path itself."""
    return asset_path(str(source)) if str(source) in BUILTIN_MODELS else Path(source)


def recorded_base(adapter: Adapter) -> str | None:
    """The adapter's `base_model_name_or_path` when it names a built-in model or an existing
    local directory (relative to the working directory) holding weights; else None (a hub id, a
    path from another machine, or nothing recorded)."""
    name = adapter.config.base_model_name_or_path
    if not name:
        return None
    if name in BUILTIN_MODELS:
        return name
    try:
        return name if Path(name).is_dir() and _weight_files(Path(name)) else None
    except LoraAnalysisError:
        return None


def _weight_files(path: Path) -> list[Path]:
    """The weight files behind a model directory or a single file."""
    if not path.exists():
        raise LoraAnalysisError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise LoraAnalysisError(f"{path}: not a weights file (expected .safetensors, .bin, .pt or .pth)")
        return [path]
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.exists():
            index_data = read_json(index, "shard index")
            weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise InputFileError(index, "not a shard index: 'weight_map' must map tensor names to file names")
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise LoraAnalysisError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return files
    files = _direct_weight_files(path)
    if files:
        return files
    inside = sorted(sub for sub in path.iterdir() if sub.is_dir() and _direct_weight_files(sub))
    hint = f"; {inside[0].name}/ holds them: pass {inside[0]}" if len(inside) == 1 else ""
    raise LoraAnalysisError(f"{path}: no model weights (*.safetensors, pytorch_model.bin) in this directory{hint}")


def _direct_weight_files(path: Path) -> list[Path]:
    for pattern in ("*.safetensors", "pytorch_model.bin", "*.bin", "*.pt", "*.pth"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    return []

