"""A fine-tuned model and its base, read one weight at a time: ΔW = W_ft − W₀ of full fine-tuning.

    pair = ModelPair("runs/full", "path/to/base")          # directories or weight files
    for name, delta in pair.deltas():                       # ΔW (d_out, d_in as stored), one module at a time
        ...
    for item in pair.pairs():                               # (name, base name, W₀, W_ft)
        ...
    pair.only_in_finetuned                                  # ["classifier"]: a new task head

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

Weights come as stored (GPT-2's Conv1D stores (d_in, d_out)); the difference is computed in
`dtype`, IEEE-rounded once (float64 holds the difference of two float32 or bf16 entries exactly
unless their magnitudes differ by more than 2²⁹).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base_weights import BaseWeights
from .errors import LoraAnalysisError, ModuleResolutionError, shown
from .naming import strip_known_prefixes


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
        """(name, ΔW = W_ft − W₀) per matched module; W₀ and W_ft are released once subtracted."""
        for name, base_name in self.matched.items():
            delta = self.finetuned.weight(name)
            delta -= self.base.weight(base_name)
            yield name, delta

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
