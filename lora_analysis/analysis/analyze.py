"""One entry point for reports: spectra and rank metrics of every module, and, given the base
weights, the analyses against W (Table 7 projections, Figure 8 φ, intruder dimensions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..adapters import Adapter
from ..base_weights import BaseWeights
from .intruders import Intruders
from .projection import ProjectionNorms, WeightSpectrum
from .spectrum import DEFAULT_TAUS, ModuleSpectrum, RankMetrics


@dataclass
class ModuleAnalysis:
    """Everything computed for one module.

    spectrum / metrics always; with base weights: weight_spectrum (W's SVD, top
    `weight_k` or full thin), projection (Table 7 at r = ΔW's numerical rank), phi_vs_weight
    ((k_W, m) grid, Fig. 8), intruders (top-k of W + ΔW, when requested).
    """

    name: str
    spectrum: ModuleSpectrum
    metrics: RankMetrics
    weight_spectrum: WeightSpectrum | None = None
    projection: ProjectionNorms | None = None
    phi_vs_weight: np.ndarray | None = None
    intruders: Intruders | None = None


@dataclass
class AdapterAnalysis:
    """Per-module analyses in adapter module order, plus what they were computed with."""

    modules: dict[str, ModuleAnalysis]
    taus: tuple[float, ...]
    source: str | None = None
    base_source: str | None = None
    alpha_known: bool = True
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> ModuleAnalysis:
        return self.modules[name]

    def __iter__(self):
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)


def analyze_adapter(
    adapter: Adapter,
    base: BaseWeights | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    progress: bool = True,
    *,
    weight_k: int = 64,
    intruders: bool = True,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    cache: bool = True,
    cache_dir: str | None = None,
    device: str | torch.device = "auto",
) -> AdapterAnalysis:
    """Analyse every module of `adapter` (progress bar on stderr unless progress=False).

    With `base`: W per module (read lazily), its SVD (top `weight_k`, exact or randomized and
    cached; the full thin SVD when `intruders`), Table 7 projections, Figure 8 φ and intruder
    dimensions. Intruders need W's full SVD: seconds for d ≤ 1024, about a minute per
    4096 × 4096 weight on 2 CPU cores, computed once and cached.
    """
    raise NotImplementedError
