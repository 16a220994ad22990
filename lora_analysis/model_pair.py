"""A fine-tuned model and its base, read one weight at a time: ΔW = W_ft − W₀ of full fine-tuning.

    pair = ModelPair("runs/full", "path/to/base")          # directories or weight files
    for name, delta in pair.deltas():                       # ΔW (d_out, d_in as stored), one module at a time
        ...
    for item in pair.pairs():                               # (name, base name, W₀, W_ft)
        ...
    pair.only_in_finetuned                                  # ["classifier"]: a new task head
    adapter = pair.adapter()                                # an `Adapter` of dense ΔW updates, streamed,
                                                            # for the analyses and `resize` as any adapter

Both checkpoints are read lazily through `BaseWeights` (safetensors with `safe_open`, sharded
checkpoints through their index file, `.bin` with `torch.load(weights_only=True, mmap=True)`):
what is resident at any time is one module's W₀, W_ft (and ΔW), never either whole model.

Every 2-D weight (`<module>.weight`) of the fine-tuned checkpoint is matched to the base's by
`naming.resolve_module_name`, so a classification model's `bert.encoder…` finds a bare
encoder's `encoder…`. `patterns` (globs, as `analyze --modules` takes them) select modules by
either name. Before anything is read, the headers are checked:
- a weight whose shapes differ in the two checkpoints is refused, in one line naming both files;
- a weight under a module the other checkpoint has (same top-level module after the known
  wrapper prefixes: `encoder`, `model.layers`, …) but missing there is refused the same way:
  the checkpoints are not a model and its base (or one is incomplete);
- a weight under a top-level module the other checkpoint does not have at all is a part only
  one of them has: listed in `only_in_finetuned` (a task head such as `classifier`, `score`,
  `lm_head` over a bare base) or `only_in_base` (a pre-training head such as BERT's `cls`).

Weights come as stored (GPT-2's Conv1D stores (d_in, d_out); conv kernels flattened per output
channel); the difference is taken in float64 (exact for two float32 or bf16 entries unless
their magnitudes differ by more than 2²⁹) and handed out in float64 (`delta`, `adapter()`) or
rounded once to `dtype` (`deltas`).

A path is a model rather than an adapter (`is_model_checkpoint`) when it is a directory holding
a model's weight files (`model.safetensors`, its shard index, `pytorch_model.bin`, ...) and no
adapter files, or a weights file whose tensors are all `<module>.weight` / `.bias` / buffers of
a model (no adapter factor names).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .adapters import Adapter, DenseModule, Storage, StreamedModules, Update, UpdateInfo
from .base_weights import BaseWeights
from .errors import LoraAnalysisError, ModuleResolutionError, shown
from .naming import strip_known_prefixes

# Files that make a directory a model (transformers' names) or an adapter (PEFT, diffusers, ...).
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "pytorch_lora_weights.safetensors", "pytorch_adapter.bin", "lit_model.pth.lora")
# Substrings of tensor names that only adapter files have (LoRA and LyCORIS factors, DoRA magnitudes).
ADAPTER_KEY_MARKERS = ("lora_", "lora.", "hada_", "lokr_", "dora_", "magnitude", "adapter")


@dataclass(frozen=True)
class WeightPair:
    """One module of both checkpoints. name: the fine-tuned checkpoint's module name;
    base_name: the base's; W0, W_ft: (d_out, d_in) as stored, in the pair's dtype."""

    name: str
    base_name: str
    W0: torch.Tensor
    W_ft: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        """ΔW = W_ft − W₀."""
        return self.W_ft - self.W0


class ModelPair:
    """A fine-tuned checkpoint and its base, matched module by module (see the module doc).

    Args:
        finetuned, base: a model directory (single or sharded, safetensors or .bin) or one
            weights file each.
        patterns: glob patterns; only modules whose name in either checkpoint matches one are
            read (None: every 2-D weight).
        dtype, device: of the tensors yielded.
    """

    def __init__(self, finetuned: str | os.PathLike, base: str | os.PathLike, patterns: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.finetuned = BaseWeights(os.fspath(finetuned), dtype=dtype, device=device)
        self.base = BaseWeights(os.fspath(base), dtype=dtype, device=device)
        self.patterns = list(patterns) if patterns is not None else None
        self.matched: dict[str, str] = {}  # fine-tuned name → base name, in the fine-tuned checkpoint's order
        self.only_in_finetuned: list[str] = []
        self.only_in_base: list[str] = []
        self._match()

    def __len__(self) -> int:
        return len(self.matched)

    @property
    def names(self) -> list[str]:
        """The fine-tuned checkpoint's names of the matched modules, in its order."""
        return list(self.matched)

    def pairs(self) -> Iterator[WeightPair]:
        """(name, base name, W₀, W_ft) per matched module, read when reached."""
        for name, base_name in self.matched.items():
            yield WeightPair(name, base_name, self.base.weight(base_name), self.finetuned.weight(name))

    def deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, ΔW = W_ft − W₀) per matched module, in the pair's dtype (subtracted in float64,
        rounded once); W₀ and W_ft are released once subtracted."""
        for name in self.matched:
            yield name, self.delta(name).to(self.finetuned.dtype)

    def adapter(self) -> Adapter:
        """The pair as an `Adapter` of dense updates ΔW = W_ft − W₀ (kind "dense", s = 1), one
        per matched module under the fine-tuned model's name, streamed: each module's ΔW is read
        and subtracted (in float64) when the analysis reaches it and dropped after. Its notes
        list the parts only one checkpoint has."""
        notes = [f"full fine-tuning ΔW = W_ft − W₀ against the base {self.base.source}"]
        if self.only_in_finetuned:
            notes.append(f"only in the fine-tuned model (not analysed): {_listed(self.only_in_finetuned)}")
        if self.only_in_base:
            notes.append(f"only in the base (not analysed): {_listed(self.only_in_base)}")
        return Adapter(PairModules(self, self.names), source=self.finetuned.source, source_format="full fine-tuning",
                       notes=notes)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW = W_ft − W₀ of matched module `name` (the fine-tuned checkpoint's name), in float64,
        (d_out, d_in) as stored."""
        W_ft = self.finetuned.weight(name).to(torch.float64)
        W_ft -= self.base.weight(self.matched[name])  # W₀ converted element by element: no float64 copy of it
        return W_ft

    def info(self, name: str) -> UpdateInfo:
        """The dense update's description, from the header (no tensor read)."""
        shape = self.finetuned.stored_shape(name)
        d_in = 1
        for n in shape[1:]:
            d_in *= n
        return UpdateInfo("dense", (shape[0], d_in), None, 1.0, 1.0, shape[0] * d_in, Storage(kernel=tuple(shape[2:]) if len(shape) > 2 else None))

    def _selected(self, name: str) -> bool:
        return self.patterns is None or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def _match(self) -> None:
        resolved: dict[str, str] = {}  # fine-tuned name → base name, for every weight the base has
        unresolved: dict[str, str] = {}  # fine-tuned name → why it has no counterpart
        for name in self.finetuned.names:
            try:
                resolved[name] = self.base.resolve(name)
            except ModuleResolutionError as err:
                unresolved[name] = str(err).split("; ")[-1]
        base_tops = {_top(n) for n in self.base.names}
        for name, closest in unresolved.items():
            if not self._selected(name):
                continue
            if _top(name) in base_tops:
                raise self._refusal(name, None, f"weight {shown(name)} of the fine-tuned model is missing in the base "
                                                f"({shown(closest, 200)})")
            self.only_in_finetuned.append(name)
        for name, base_name in resolved.items():
            if self._selected(name) or self._selected(base_name):
                self._check_shapes(name, base_name)
                self.matched[name] = base_name
        self._check_one_to_one()
        counterparts = set(resolved.values())
        finetuned_tops = {_top(n) for n in self.finetuned.names}
        for base_name in self.base.names:
            if base_name in counterparts or not self._selected(base_name):
                continue
            if _top(base_name) in finetuned_tops:
                raise self._refusal(None, base_name, f"weight {shown(base_name)} of the base is missing in the fine-tuned model")
            self.only_in_base.append(base_name)
        if not self.matched:
            what = f"matching {self.patterns}" if self.patterns is not None else "in common"
            raise LoraAnalysisError(f"{shown(self.finetuned.source)} vs {shown(self.base.source)}: no 2-D weights {what}")

    def _check_shapes(self, name: str, base_name: str) -> None:
        ft_shape, base_shape = self.finetuned.stored_shape(name), self.base.stored_shape(base_name)
        if ft_shape != base_shape:
            raise self._refusal(name, base_name, f"weight {shown(name)} has shape {ft_shape} in the fine-tuned model and "
                                                 f"{base_shape} in the base")

    def _check_one_to_one(self) -> None:
        seen: dict[str, str] = {}
        for name, base_name in self.matched.items():
            if base_name in seen:
                raise self._refusal(name, base_name, f"weights {shown(seen[base_name])} and {shown(name)} of the fine-tuned "
                                                     f"model both match the base's {shown(base_name)}")
            seen[base_name] = name

    def _refusal(self, name: str | None, base_name: str | None, problem: str) -> LoraAnalysisError:
        """One line naming the two files involved (the shards holding the weight, where known)."""
        ft_file = self.finetuned.file_of(name) if name is not None else self.finetuned.source
        base_file = self.base.file_of(base_name) if base_name is not None else self.base.source
        return LoraAnalysisError(f"{shown(ft_file)} vs {shown(base_file)}: {problem}")


def _top(name: str) -> str:
    """The top-level module of a weight's path, past the known wrapper prefixes:
    `bert.encoder.layer.0.attention.self.query` → `encoder`, `classifier` → `classifier`."""
    return strip_known_prefixes(name).split(".")[0]


class PairModules(StreamedModules):
    """{module name: DenseModule(ΔW = W_ft − W₀)} of a `ModelPair`, made on access, never cached."""

    def __init__(self, pair: ModelPair, names: Sequence[str], transform: Callable[[Update], Update] | None = None):
        self.pair, self.names, self.transform = pair, list(names), transform

    def __getitem__(self, name: str) -> Update:
        if name not in self.names:
            raise KeyError(name)
        shape = self.pair.finetuned.stored_shape(name)
        delta = self.pair.delta(name)
        update: Update = DenseModule(delta=delta, alpha=1.0, divisor=1.0,
                                     kernel=tuple(shape[2:]) if len(shape) > 2 else None)
        return self.transform(update) if self.transform else update

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def info(self, name: str) -> UpdateInfo:
        return self.pair.info(name)

    def subset(self, names: list[str]) -> "PairModules":
        return PairModules(self.pair, names, self.transform)

    def mapped(self, transform: Callable[[Update], Update]) -> "PairModules":
        inner = self.transform

        def both(update: Update) -> Update:
            return transform(inner(update) if inner else update)

        return PairModules(self.pair, self.names, both)


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a model's weights rather than an adapter (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        has = {p.name for p in path.iterdir()}
        model = any(n in has for n in MODEL_WEIGHT_FILES) or any(fnmatch.fnmatchcase(n, "model-*-of-*.safetensors") for n in has)
        return model and not any(n in has for n in ADAPTER_FILES)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 — not readable as safetensors: the adapter readers say why
        return False
    return bool(keys) and not any(marker in key.lower() for key in keys for marker in ADAPTER_KEY_MARKERS)


def _listed(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
