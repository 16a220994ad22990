"""The `Adapter` data model: one update per module, independent of any model or file layout.

Per module an `Update` (`updates.py`): LoRA's ΔW = s·B·A (Hu et al. 2021, arXiv 2106.09685)
or another kind (AdaLoRA, Tucker, LoHa, LoKr, DoRA, dense), each with its shape in the
`nn.Linear` orientation (d_out, d_in), its storage, α and scale, and an exact factored form.

An adapter read from a file can hold its modules lazily (`LazyModules`): each module's
tensors are read from the file (memory-mapped) when the module is asked for and dropped
after, so analysing a 7B adapter never holds all its factors at once. What reports need
without the tensors — kind, shape, r, α, scale, parameters — is `Adapter.info(name)`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, ItemsView, Iterator, Mapping

import torch

from ..config import LoraConfig
from ..errors import AdapterFormatError, shown
from .containers import TensorFile
from .updates import DoraModule, LoraModule, Update, UpdateInfo, delta_weight

__all__ = ["Adapter", "LazyModules", "LoraModule", "ModuleSpec", "delta_weight"]


@dataclass
class ModuleSpec:
    """How a reader builds one module's update from its file: `keys` maps roles (A, B, E, mid,
    w1_a, magnitude, ...) to tensor keys, `build` makes the update from {role: tensor} and
    raises `AdapterFormatError` on shapes it cannot take. Built once on "meta" tensors at load
    (the structure is checked without reading data), then on the real tensors when asked for."""

    keys: dict[str, str]
    build: Callable[[dict[str, torch.Tensor]], Update]


def checked_tensor(path: object, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A factor read from a file: floating point and finite, else one line naming the key."""
    if not tensor.is_floating_point():
        raise AdapterFormatError(str(path), f"{shown(key)} has dtype {tensor.dtype}, expected floating point")
    if tensor.device.type != "meta" and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterFormatError(str(path), f"{shown(key)} has {bad} NaN/Inf value(s)")
    return tensor


class LazyModules(Mapping[str, Update]):
    """{module name: update} read from a tensor file on access, never cached (streaming).

    The structure of every module was checked at construction (built on meta tensors);
    `info(name)` answers from there without reading data. `transform` (e.g. DoRA → its
    direction update) is applied to every update handed out."""

    def __init__(self, source: TensorFile, specs: Mapping[str, ModuleSpec],
                 transform: Callable[[Update], Update] | None = None, infos: Mapping[str, UpdateInfo] | None = None):
        self.source, self.specs, self.transform = source, dict(specs), transform
        if infos is None:
            infos = {name: self._build(spec, {role: source.meta(key) for role, key in spec.keys.items()}).info
                     for name, spec in self.specs.items()}
        self._infos = dict(infos)

    def _build(self, spec: ModuleSpec, tensors: dict[str, torch.Tensor]) -> Update:
        for role, key in spec.keys.items():
            checked_tensor(self.source.path, key, tensors[role])
        update = spec.build(tensors)
        return self.transform(update) if self.transform else update

    def __getitem__(self, name: str) -> Update:
        spec = self.specs[name]
        return self._build(spec, {role: self.source.get(key) for role, key in spec.keys.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def info(self, name: str) -> UpdateInfo:
        return self._infos[name]

    def subset(self, names: list[str]) -> "LazyModules":
        return LazyModules(self.source, {n: self.specs[n] for n in names}, self.transform, {n: self._infos[n] for n in names})

    def mapped(self, transform: Callable[[Update], Update]) -> "LazyModules":
        """The same modules with `transform` applied to each (after any transform already set)."""
        inner = self.transform

        def both(update: Update) -> Update:
            return transform(inner(update) if inner else update)

        return LazyModules(self.source, self.specs, both)


@dataclass
class Adapter:
    """An adapter: one update per module path, extra trained tensors, its config, and notes.

    `modules` is keyed by the module path inside the base model as the model names it (no
    PEFT `base_model.model.`, no kohya mangling), prefixed `component/` (`unet/…`,
    `text_encoder/…`) only when the file holds several components. `extra_tensors` holds
    `modules_to_save` (and trained bias) tensors keyed by parameter name. `notes` say how the
    reader settled what the format leaves open (shown in reports).
    """

    modules: Mapping[str, Update]
    config: LoraConfig = field(default_factory=LoraConfig)
    extra_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None
    source_format: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [name for name in self.modules if not self.info(name).alpha_known]
        if unknown:
            where = f" in {self.source}" if self.source else ""
            warnings.warn(
                f"LoRA alpha unknown for {len(unknown)} module(s){where} (e.g. {unknown[0]}): "
                "scale s = alpha/r is reported as unknown and 1.0 is used for ΔW",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> Update:
        return self.modules[name]

    def items(self) -> ItemsView[str, Update]:
        return self.modules.items()

    def info(self, name: str) -> UpdateInfo:
        """Kind, shape, r, α, scale, parameters of a module, without reading its tensors."""
        if isinstance(self.modules, LazyModules):
            return self.modules.info(name)
        return self.modules[name].info

    @property
    def alpha_known(self) -> bool:
        return all(self.info(name).alpha_known for name in self.modules)

    @property
    def ranks(self) -> dict[str, int | None]:
        return {name: self.info(name).r for name in self.modules}

    @property
    def kinds(self) -> dict[str, int]:
        """{kind: number of modules}, in order of first appearance."""
        return dict(Counter(self.info(name).kind for name in self.modules))

    def num_parameters(self) -> int:
        """Parameters of the updates' tensors (LoRA: Σ r·(d_in + d_out))."""
        return sum(self.info(name).parameters for name in self.modules)

    def select(self, names: list[str]) -> "Adapter":
        """A view restricted to `names` (same tensors, no copy, no repeated warning)."""
        modules = self.modules.subset(names) if isinstance(self.modules, LazyModules) else {n: self.modules[n] for n in names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return replace(self, modules=modules)

    def dora_directions(self) -> "Adapter":
        """This adapter with every DoRA update replaced by its direction update s·B·A alone
        (kind `dora-direction`, labelled in every output): for analyses without base weights."""

        def direction(update: Update) -> Update:
            return update.direction() if isinstance(update, DoraModule) else update

        if isinstance(self.modules, LazyModules):
            modules: Mapping[str, Update] = self.modules.mapped(direction)
        else:
            modules = {name: direction(m) for name, m in self.modules.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return replace(self, modules=modules)
