"""Read and write adapter files.

Written (PEFT's layout, so PEFT and the rest of the ecosystem read it):

    out_dir/                       save_adapter(adapter, "out_dir")
        adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r),
                                   base_model.model.<param> (modules_to_save, biases)
        adapter_config.json        PEFT LoraConfig, peft_type "LORA"
    adapter.safetensors            save_adapter(adapter, "adapter.safetensors"): the same tensors alone

The safetensors header metadata holds {"format": "pt", "adapter_config": <the config JSON>} so a
lone file describes itself, and "alpha_unknown": [modules] when some α was unknown.

Read (`load_adapter`): every format of `formats` (PEFT and ours, diffusers, kohya, LyCORIS,
loralib, torchtune, LitGPT, AdapterHub), as safetensors or as torch files that
`torch.load(weights_only=True)` accepts — nothing is ever unpickled otherwise — through the
bounded, memory-mapped containers of `containers.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save as safetensors_bytes

from ..config import LoraConfig
from ..errors import AdapterFormatError, LoraAnalysisError, shown
from ..fileio import atomic_write_bytes, atomic_write_text, parse_json
from .adapter import Adapter, LazyModules, checked_tensor
from .containers import LazyTensors, open_tensor_file
from .formats import AdapterFiles, reader_for
from .formats.common import ModuleKey
from .formats.peft import CONFIG_NAME, HEADER_ALPHA_UNKNOWN_KEY, HEADER_CONFIG_KEY, PEFT_PREFIX
from .peft_config import default_and_pattern, peft_config_dict
from .updates import LoraModule

# Weight files looked for in a directory, in this order (PEFT and torchtune, diffusers,
# AdapterHub, LitGPT).
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt",
                 "pytorch_lora_weights.safetensors", "pytorch_adapter.bin", "lit_model.pth.lora")
__all__ = ["CONFIG_NAME", "HEADER_CONFIG_KEY", "check_config_matches_weights", "deterministic_safetensors",
           "load_adapter", "save_adapter"]


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> Path:
    """Write `adapter` in PEFT's layout; returns the path written.

    `path` ending in `.safetensors`: one self-describing file. Otherwise a directory holding
    `adapter_model.safetensors` and `adapter_config.json` (created if needed). Per-module r and
    α are written as rank_pattern/alpha_pattern so PEFT rebuilds each module exactly; a local
    absolute `base_model_name_or_path` is reduced to its last component. Each file is written
    atomically. Only plain LoRA modules on Linear layers (s·B·A) can be written this way.
    """
    path = Path(path)
    modules = {name: adapter[name] for name in adapter.modules}
    for name, m in modules.items():
        plain = type(m) is LoraModule and m.parts == 1 and m.bias is None and m.kernel is None
        if not plain or (m.storage.transposed and not m.fan_in_fan_out):
            raise LoraAnalysisError(f"cannot save module {shown(name)!r}: a {m.kind} update of this form has no "
                                    "PEFT LoRA-on-Linear layout")
    config = peft_config_dict(adapter)
    factors = {name: (_portable(m.A), _portable(m.B)) for name, m in modules.items() if isinstance(m, LoraModule)}
    tensors = {PEFT_PREFIX + name + suffix: t for name, (A, B) in factors.items()
               for suffix, t in ((".lora_A.weight", A), (".lora_B.weight", B))}
    tensors.update({PEFT_PREFIX + name: _portable(t) for name, t in adapter.extra_tensors.items()})
    metadata = {"format": "pt", HEADER_CONFIG_KEY: json.dumps(config)}
    unknown = [name for name in adapter.modules if not adapter.info(name).alpha_known]
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


def load_adapter(path: str | os.PathLike, alpha: float | None = None, *, lazy: bool = False,
                 weight_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Adapter:
    """Read an adapter from a file or a directory; the format is detected (`formats.READERS`).

    Module names come out as the model names them; updates of every kind (`updates.py`), α
    from wherever the format records it (PEFT config and patterns, kohya/LyCORIS `.alpha`,
    diffusers' `lora_adapter_metadata`, AdapterHub's and torchtune's configs, LitGPT's
    model_config.yaml). `alpha` fills in α where the file records none; where it stays unknown
    the Adapter warns and reports s as unknown.

    lazy: keep the modules in the file and read each one's tensors when it is asked for (the
        structure of every module is checked now; NaN/Inf when a module is read). Default:
        read and check every tensor now.
    weight_shapes: {tensor name: stored shape} of the base model, for formats that need them
        to tell layers apart (loralib convs, PEFT target_parameters on several parameters).

    Raises `AdapterFormatError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFormatError(path, "no such file or directory")
    tensors = open_tensor_file(_weights_file(path) if path.is_dir() else path)
    files = AdapterFiles(path, tensors, weight_shapes)
    reader = reader_for(files)
    if reader is None:
        if not files.keys:
            raise AdapterFormatError(tensors.path, "empty adapter: the file holds no tensors")
        raise AdapterFormatError(
            tensors.path,
            f"unknown key layout (e.g. {shown(files.keys[0])!r}): expected PEFT '<module>.lora_A.weight', "
            "kohya '<name>.lora_down.weight', LyCORIS, diffusers, loralib '<module>.lora_A', torchtune, LitGPT or "
            "AdapterHub keys",
        )
    result = reader.read(files, alpha)
    if not result.modules:
        raise AdapterFormatError(tensors.path, f"holds no adapter modules ({reader.name} layout, {len(files.keys)} other tensors)")
    qualify = len({component for component, _ in result.modules}) > 1
    specs = {_module_key(key, qualify): spec for key, spec in result.modules.items()}
    modules = LazyModules(tensors, specs)
    extra = LazyTensors(tensors, result.extra)
    config = result.config or _config_describing(modules)
    if lazy:
        return Adapter(modules, config, extra, source=str(path), source_format=result.format, notes=result.notes)
    eager = {name: modules[name] for name in modules}
    extras = {name: checked_tensor(tensors.path, key, tensors.get(key)) for name, key in result.extra.items()}
    return Adapter(eager, config, extras, source=str(path), source_format=result.format, notes=result.notes)


def _module_key(key: ModuleKey, qualify: bool) -> str:
    """The module's name in the Adapter: its path, as `component/path` when the file holds
    several components (`qualify`: SD's unet and text encoders may share paths)."""
    component, name = key
    return f"{component}/{name}" if component is not None and qualify else name


def _weights_file(directory: Path) -> Path:
    for name in WEIGHTS_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise AdapterFormatError(directory, f"directory holds no {' or '.join(WEIGHTS_NAMES)}")


def _config_describing(modules: LazyModules) -> LoraConfig:
    """A config for files that carry none (kohya, loralib, ...): their modules, ranks and α's."""
    infos = {name: modules.info(name) for name in modules}
    ranks = {n: i.r for n, i in infos.items() if i.r is not None}
    r, rank_pattern = default_and_pattern(None, {}, ranks) if ranks else (8, {})
    alphas = {n: i.alpha for n, i in infos.items() if i.alpha is not None}
    alpha, alpha_pattern = default_and_pattern(None, {}, alphas) if alphas else (None, {})
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern)


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

