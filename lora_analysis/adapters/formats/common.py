"""What every reader shares: the files it reads, what it returns, and the factor checks.

A reader turns the keys, shapes and side files of an adapter into `ModuleSpec`s (which tensors
make which module's update, and how) without reading tensor data; `files.load_adapter` then
builds the updates on "meta" tensors to check every shape, and reads the data when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ...config import LoraConfig
from ...errors import AdapterFormatError, shown
from ...fileio import read_json
from ..adapter import ModuleSpec
from ..containers import TensorFile
from ..updates import DoraModule, LoraModule, Update

ModuleKey = tuple["str | None", str]  # (component, module path)
Builder = Callable[[dict[str, torch.Tensor]], Update]  # {role: tensor} → update


@dataclass
class AdapterFiles:
    """What a reader sees: the path the user gave (file or directory), the tensor file, the
    base model's stored weight shapes when the caller has them (loralib needs them to tell a
    Conv2d from a Linear), and the files beside the tensor file."""

    path: Path
    tensors: TensorFile
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None
    _keys: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = self.tensors.keys()
        return self._keys

    @property
    def weights(self) -> Path:
        return self.tensors.path

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.tensors.path.parent

    def beside(self, name: str) -> Path | None:
        candidate = self.directory / name
        return candidate if candidate.is_file() else None

    def json_beside(self, name: str, what: str) -> tuple[Any, Path] | None:
        """(parsed JSON, path) of `name` beside the tensor file, None if there is none."""
        path = self.beside(name)
        return None if path is None else (read_json(path, what, AdapterFormatError), path)

    def fail(self, problem: str) -> AdapterFormatError:
        return AdapterFormatError(self.weights, problem)


@dataclass
class ReadResult:
    """A reader's answer: modules by (component, module path), extra tensors by parameter name
    (→ tensor key), the config to describe the adapter with, and notes on what the format left
    open."""

    format: str
    modules: dict[ModuleKey, ModuleSpec]
    extra: dict[str, str] = field(default_factory=dict)
    config: LoraConfig | None = None
    notes: list[str] = field(default_factory=list)


class Reader:
    """One format family: `detect` from keys / metadata / side files, `read` into a ReadResult."""

    name: str = ""

    def detect(self, files: AdapterFiles) -> bool:
        raise NotImplementedError

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        """`alpha`: what the caller assumes where the file records no α (None: unknown)."""
        raise NotImplementedError


def group_by_suffix(files: AdapterFiles, keys: Iterable[str],
                    roles: Mapping[str, str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({module: {role: key}}, other keys) by the longest matching role suffix
    (`roles`: suffix → role, e.g. ".lora_A.weight" → "A")."""
    ordered = sorted(roles, key=len, reverse=True)
    modules: dict[str, dict[str, str]] = {}
    rest = []
    for key in keys:
        for suffix in ordered:
            if key.endswith(suffix) and len(key) > len(suffix):
                module = key[: -len(suffix)]
                role = roles[suffix]
                if role in modules.get(module, {}):
                    raise files.fail(f"key {shown(key)!r} repeats role {role} of module {shown(module)!r}")
                modules.setdefault(module, {})[role] = key
                break
        else:
            rest.append(key)
    return modules, rest


def require_pair(files: AdapterFiles, name: str, roles: Mapping[str, str], a: str = "A", b: str = "B",
                 label: tuple[str, str] = ("lora_A", "lora_B")) -> None:
    """One line when a module has only one of its two factors."""
    if (a in roles) != (b in roles):
        have, lack = (label[0], label[1]) if a in roles else (label[1], label[0])
        raise files.fail(f"module {shown(name)!r} has {have} but no {lack}")


def matricize(files: AdapterFiles, name: str, A: torch.Tensor, B: torch.Tensor, allow_empty: bool = False,
              label: tuple[str, str] = ("lora_A", "lora_B")) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
    """(A: (r, d_in), B: (d_out, r), kernel) from 2-D factors or conv factors: down (r, c_in, *kernel)
    → (r, c_in·∏kernel), up (c_out, r, 1, …) → (c_out, r); checks dims and ranks."""
    for part, factor in ((label[0], A), (label[1], B)):
        if factor.ndim < 2 or factor.ndim > 5:
            raise files.fail(f"{part} of module {shown(name)!r} is {factor.ndim}-D {tuple(factor.shape)}, expected 2-D")
        if factor.numel() == 0 and not allow_empty:
            raise files.fail(f"{part} of module {shown(name)!r} is empty {tuple(factor.shape)}")
    kernel = None
    if A.ndim != B.ndim:
        raise files.fail(f"{label[0]} of module {shown(name)!r} is {A.ndim}-D {tuple(A.shape)} but {label[1]} is "
                         f"{B.ndim}-D {tuple(B.shape)}: expected both 2-D, or conv factors of equal dimension")
    if A.ndim > 2:
        if any(n != 1 for n in B.shape[2:]):
            raise files.fail(f"{label[1]} of conv module {shown(name)!r} has shape {tuple(B.shape)}: expected (c_out, r, 1, …)")
        kernel = tuple(A.shape[2:])
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    if A.shape[0] != B.shape[1]:
        raise files.fail(
            f"rank mismatch in module {shown(name)!r}: {label[0]} {tuple(A.shape)} has rank {A.shape[0]}, "
            f"{label[1]} {tuple(B.shape)} has rank {B.shape[1]}")
    return A, B, kernel


def scalar(files: AdapterFiles, key: str) -> float:
    """A 0-dim / one-element tensor's value (kohya `.alpha`), finite."""
    tensor = files.tensors.get(key)
    if tensor.numel() != 1:
        raise files.fail(f"{shown(key)!r} must be one number, got shape {tuple(tensor.shape)}")
    value = float(tensor.reshape(-1)[0].double())
    if not math.isfinite(value):
        raise files.fail(f"{shown(key)!r} must be one finite number, got {value}")
    return value


def dora_spec_builder(files: AdapterFiles, name: str, direction: Callable[[dict[str, torch.Tensor]], Update],
                      epsilon: Callable[[torch.Tensor], float] = lambda m: 0.0,
                      lycoris_layout: bool = False) -> Callable[[dict[str, torch.Tensor]], Update]:
    """A builder wrapping `direction`'s update with the "magnitude" tensor into a DoRA update.

    PEFT / torchtune: d_out magnitudes in any shape ((d_out,), PEFT's conv (1, c_out, 1, 1)),
    norms per output row. LyCORIS (`lycoris_layout`): (d_out, 1, …) for norms per output row,
    (1, c_in, …) for norms per input channel (wd_on_output=False)."""

    def build(tensors: dict[str, torch.Tensor]) -> Update:
        inner = direction(tensors)
        m = tensors["magnitude"]
        d_out, d_in = inner.shape
        if not lycoris_layout and m.numel() == d_out and sum(n != 1 for n in m.shape) <= 1:
            return DoraModule(inner, m.reshape(-1), True, epsilon(m))
        if lycoris_layout and m.ndim >= 2 and m.numel() == m.shape[0] == d_out:
            return DoraModule(inner, m.reshape(-1), True, epsilon(m))
        if lycoris_layout and m.ndim >= 2 and m.shape[0] == 1 and m.numel() == m.shape[1] and d_in % m.shape[1] == 0:
            return DoraModule(inner, m.reshape(-1), False, epsilon(m))
        raise files.fail(f"DoRA magnitude of module {shown(name)!r} has shape {tuple(m.shape)}, ΔW has "
                         f"(d_out, d_in) = {inner.shape}")

    return build


def lora_builder(files: AdapterFiles, name: str, alpha: float | None, *, use_rslora: bool = False,
                 fan_in_fan_out: bool = False, transposed: bool | None = False, component: str | None = None,
                 notes: tuple[str, ...] = ()) -> Callable[[dict[str, torch.Tensor]], LoraModule]:
    """A builder of s·B·A from roles "A", "B" (2-D or conv factors)."""

    def build(tensors: dict[str, torch.Tensor]) -> LoraModule:
        A, B, kernel = matricize(files, name, tensors["A"], tensors["B"])
        return LoraModule(A=A, B=B, alpha=alpha, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out,
                          kernel=kernel, transposed=transposed, component=component, notes=notes)

    return build


def spec(keys: dict[str, str], build: Callable[[dict[str, torch.Tensor]], Update]) -> ModuleSpec:
    return ModuleSpec(dict(keys), build)


def check_no_duplicates(files: AdapterFiles, names: Mapping[str, ModuleKey]) -> None:
    """One module given twice under two names (`base_model.model.m` and `m`) is refused."""
    seen: dict[ModuleKey, str] = {}
    for raw, key in names.items():
        if key in seen:
            raise files.fail(f"module {shown(key[1])!r} is given twice, as {shown(seen[key])!r} and {shown(raw)!r}")
        seen[key] = raw


# Suffixes that only one layout writes: an unexpected key carrying one of them means the file
# mixes layouts (say so, rather than "unexpected key").
LAYOUT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "peft": (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_magnitude_vector", ".lora_E"),
    "kohya": (".lora_down.weight", ".lora_up.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".dora_scale"),
    "torchtune": (".lora_a.weight", ".lora_b.weight"),
    "diffusers": (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight"),
    "loralib": (".lora_A", ".lora_B"),
}


def unexpected_key(files: AdapterFiles, layout: str, key: str) -> AdapterFormatError:
    """The error for a key a reader cannot place: "mixes key layouts" when another layout
    writes keys like it, else "unexpected key"."""
    others = [name for name, suffixes in LAYOUT_SUFFIXES.items() if name != layout and key.endswith(suffixes)]
    if others:
        return files.fail(f"mixes key layouts {[layout, others[0]]} (e.g. {shown(key)!r}); expected one of them")
    return files.fail(f"unexpected key {shown(key)!r} in a {layout} LoRA file")

