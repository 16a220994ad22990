"""Lazy access to pretrained weights W by module name, one module at a time.

Sources: a built-in model name (`minilm`), a Hugging Face model directory (`model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` loaded with
weights_only), a single `.safetensors` / `.bin` / `.pt` file, or an in-memory `nn.Module` (layers
wrapping a pretrained one, such as `lora.LoraLinear`, give their frozen base weight: see
`WrappedLayer`). `recorded_base` finds an adapter's own base model from its
`base_model_name_or_path` when that names a built-in or a local directory. Adapter module names are resolved against the checkpoint's with
`naming.resolve_module_name` (`base_model.model.`, `bert.`, `model.` prefixes, ...).

W is returned as (d_out, d_in), the `nn.Linear` orientation: GPT-2's Conv1D stores (d_in, d_out)
and is transposed, and so is an embedding's (num_embeddings, dim); a conv kernel (c_out, c_in,
kh, kw) is flattened per output channel, (c_out, c_in·kh·kw), as its updates are. For a file,
the orientation follows the adapter module's own record (`Storage.transposed`: PEFT's
`fan_in_fan_out` for Conv1D layers, embeddings), for an in-memory model the layer's type; a
stored shape that disagrees is refused, never re-oriented to fit. Only where the adapter records
no orientation (loralib) does a non-square shape decide; a square one is then refused.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from torch import nn

from .adapters import Adapter, Update, UpdateInfo
from .assets import BUILTIN_MODELS, asset_path
from .errors import InputFileError, LoraAnalysisError, ModuleResolutionError, shown, unpickling_refusal
from .fileio import read_json
from .naming import resolve_module_name

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@runtime_checkable
class WrappedLayer(Protocol):
    """A layer wrapping a pretrained one, as `lora.LoraLinear` (and PEFT's LoRA layers) do.

    W is `get_base_layer().weight`, and only while `merged` is False: a merged layer's weight
    is W + ΔW. This is the seam that lets in-memory models be read without knowing the LoRA
    core.
    """

    merged: bool

    def get_base_layer(self) -> nn.Module: ...


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2), which stores W as (d_in, d_out). A Conv1D can
    only exist once transformers is imported, so this never imports transformers itself."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D, whatever the weight's storage orientation."""
    d0, d1 = weight_of(module).shape
    return (d1, d0) if is_conv1d(module) else (d0, d1)


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's `weight` tensor (typed: `nn.Module` attributes may also be modules)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise LoraAnalysisError(f"{type(module).__name__}.weight is not a tensor")
    return weight


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
        self._shapes: dict[str, tuple[int, ...]] = {}  # stored shapes of the weights (≥ 2-D)
        self._tensor_shapes: dict[str, tuple[int, ...]] = {}  # every tensor of the files
        self._bin_cache: dict[Path, dict[str, Any]] = {}  # a weights-only state dict: tensors and more
        if isinstance(source, nn.Module):
            self.source = f"in-memory {type(source).__name__}"
            self._index_module(source)
        else:
            self.source = str(source)
            self._index_files(_weight_files(model_path(source)))
        if not self._shapes:
            raise LoraAnalysisError(f"{self.source}: no weights of 2 or more dimensions found")

    @property
    def names(self) -> list[str]:
        """Module names that have a `weight` of 2 or more dimensions, in checkpoint order."""
        return list(self._shapes)

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """{tensor name: stored shape} of every tensor (weights, biases, fused parameters), for
        adapter formats that need the model's shapes to tell layers apart (`load_adapter`)."""
        if self._modules and not self._tensor_shapes:
            return {f"{name}.weight": shape for name, shape in self._shapes.items()}
        return dict(self._tensor_shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except LoraAnalysisError:
            return False
        return True

    def resolve(self, name: str, component: str | None = None, weight_suffix: str | None = None) -> str:
        """The checkpoint's name for adapter module `name` (of pipeline `component`, when the
        adapter records one: a checkpoint of several components names it `component.name`;
        `weight_suffix`: a tool's wrapper keeps W at `name.suffix`, tried second);
        `ModuleResolutionError` lists the closest."""
        component, _, path = name.rpartition("/") if "/" in name else (component or "", "", name)
        if component and f"{component}.{path}" in self._shapes:
            return f"{component}.{path}"
        try:
            return resolve_module_name(path, self._shapes, what=f"base weights {self.source}")
        except ModuleResolutionError:
            if not weight_suffix:
                raise
            return resolve_module_name(f"{path}.{weight_suffix}", self._shapes, what=f"base weights {self.source}")

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self.resolve(name)]

    def weight(self, name: str, module: Update | UpdateInfo | None = None) -> torch.Tensor:
        """W for adapter module `name`, (d_out, d_in); conv kernels flattened per output channel.

        With `module` (an update or its info), W is oriented and checked against its
        (d_out, d_in); without it, file weights come as stored and in-memory Conv1D weights are
        transposed.
        """
        info = module.info if isinstance(module, Update) else module
        if info is not None and info.storage.experts:
            raise LoraAnalysisError(f"module {shown(name)}: analyses against the base weights of fused expert parameters "
                                    "are not supported")
        key = self.resolve(name, info.component, info.storage.weight_suffix) if info else self.resolve(name)
        stored = self._read(key)
        if not torch.is_floating_point(stored) or not torch.isfinite(stored).all():
            raise LoraAnalysisError(f"{self.source}: weight {shown(key)} is not finite floating point")
        if stored.ndim > 2:
            stored = stored.reshape(stored.shape[0], -1)
        transpose = self._is_transposed(key, stored.shape, info)
        W = stored.T if transpose else stored
        return W.to(device=self.device, dtype=self.dtype).contiguous()

    def _is_transposed(self, key: str, shape: torch.Size, info: UpdateInfo | None) -> bool:
        """Whether W is stored as (d_in, d_out). Never guessed from the shape where it is
        recorded: an in-memory layer's type says it (Conv1D, Embedding), for a file the adapter
        module's own record (`Storage.transposed`, from PEFT's `fan_in_fan_out`); the stored
        shape must then agree with it. Unrecorded (loralib): a non-square shape decides."""
        transposed: bool | None
        if key in self._modules:
            transposed = is_conv1d(self._modules[key]) or isinstance(self._modules[key], nn.Embedding)
        elif info is None:
            return False
        else:
            transposed = info.storage.transposed
        if info is None:
            return bool(transposed)
        linear = info.shape
        if transposed is None:
            return self._unrecorded_orientation(key, shape, linear)
        expected = linear[::-1] if transposed else linear
        if tuple(shape) == expected:
            return transposed
        layout = "(d_in, d_out), a Conv1D's layout" if transposed else "(d_out, d_in), nn.Linear's layout"
        record = "its type" if key in self._modules else f"the adapter (fan_in_fan_out={str(transposed).lower()})"
        problem = f"weight {shown(key)} is stored as {tuple(shape)}, but {record} says {layout}: {expected}"
        if tuple(shape) == expected[::-1]:
            problem += "; its orientation is never guessed from the shape (a Conv1D base needs fan_in_fan_out: true)"
        raise InputFileError(self.source, problem)

    def _unrecorded_orientation(self, key: str, shape: torch.Size, linear: tuple[int, int]) -> bool:
        """Whether W is stored transposed, for an adapter that does not record it (loralib): a
        non-square shape matches one orientation only; a square one cannot be told apart."""
        if linear[0] != linear[1] and tuple(shape) in (linear, linear[::-1]):
            return tuple(shape) != linear
        if tuple(shape) == linear:
            raise InputFileError(self.source, f"weight {shown(key)} is square and the adapter does not record whether "
                                              "ΔW is stored transposed (loralib): cannot orient it")
        raise InputFileError(self.source, f"weight {shown(key)} is stored as {tuple(shape)}, but the adapter module "
                                          f"is (d_out, d_in) = {linear}")

    def _read(self, key: str) -> torch.Tensor:
        if key in self._modules:
            return weight_of(self._modules[key]).detach()
        path = self._files[key]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(f"{key}.weight")
        return self._bin(path)[f"{key}.weight"]

    def _index_module(self, model: nn.Module) -> None:
        inside: str | None = None  # the path prefix of the wrapper being walked through
        for name, module in model.named_modules():  # pre-order: a wrapper's parts follow it
            if inside is not None and name.startswith(inside):
                continue  # the wrapper's own parts; its base layer is read through the wrapper
            inside = None
            if isinstance(module, WrappedLayer):
                if module.merged:
                    raise LoraAnalysisError(f"{self.source}: LoRA layer {shown(name)} is merged, so its weight is W + ΔW; unmerge it first")
                inside = f"{name}." if name else ""
                module = module.get_base_layer()
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
                self._modules[name] = module
                self._shapes[name] = tuple(weight.shape)

    def _index_files(self, files: list[Path]) -> None:
        for path in files:
            for key, shape in self._stored_shapes(path).items():
                self._tensor_shapes[key] = shape
                if key.endswith(".weight") and len(shape) >= 2:
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
            raise InputFileError(path, f"cannot read safetensors header ({shown(e)})") from None

    def _bin(self, path: Path) -> dict[str, Any]:
        if path not in self._bin_cache:
            try:  # mmap: tensors are paged in when read, not all at load time
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:  # code or classes beyond tensors: never run
                raise InputFileError(path, f"refused pickle: torch.load(weights_only=True) rejects it ({unpickling_refusal(e)})") from None
            except Exception as e:  # noqa: BLE001 — any other loading failure is a bad file
                problem = f"cannot load as a weights-only PyTorch checkpoint ({type(e).__name__}: {shown(str(e).split('. ')[0])})"
                raise InputFileError(path, problem) from None
            if not isinstance(state, dict):
                raise InputFileError(path, f"not a state dict (got {type(state).__name__})")
            self._bin_cache[path] = state
        return self._bin_cache[path]

    def file_of(self, name: str) -> str:
        """The file holding module `name`'s weight (its shard, for sharded checkpoints), or
        the in-memory source's description: where a problem with that weight lies."""
        key = self.resolve(name)
        return str(self._files[key]) if key in self._files else self.source


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

