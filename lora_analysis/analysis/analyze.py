"""One entry point for reports: spectra and rank metrics of every module, and, given the base
weights, the analyses against W (Table 7 projections, Figure 8 φ, intruder dimensions)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..base_weights import BaseWeights
from .intruders import Intruders, intruder_dimensions
from .projection import ProjectionNorms, WeightSpectrum, phi_vs_weight, projection_norms, weight_svd
from .spectrum import DEFAULT_TAUS, ModuleSpectrum, RankMetrics, iter_spectra


@dataclass
class ModuleAnalysis:
    """Everything computed for one module.

    spectrum / metrics always; with base weights: weight_spectrum (W's top max(weight_k, rank)
    singular triplets), projection (Table 7 at r = ΔW's numerical rank), phi_vs_weight
    ((weight_k, m) grid, Fig. 8), intruders (top-k of W + ΔW; None where skipped).
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
    intruders: bool | None = None,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    exact_max_dim: int = 1536,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
) -> AdapterAnalysis:
    """Analyse every module of `adapter` (progress bar on stderr unless progress=False).

    With `base`: W per module (read lazily, one at a time), its SVD (top max(weight_k, r),
    exact when min(d) ≤ exact_max_dim, else randomized; cached on disk), Table 7 projections,
    Figure 8 φ and intruder dimensions. Intruders need W's full SVD: intruders=None computes
    them only for modules with min(d) ≤ exact_max_dim (seconds) and notes the skipped ones;
    True forces them (about a minute per 4096 × 4096 weight on 2 CPU cores, cached).
    """
    taus = tuple(float(t) for t in taus)
    analysis = AdapterAnalysis({}, taus, adapter.source, base.source if base else None, adapter.alpha_known)
    if not adapter.alpha_known:
        analysis.notes.append(
            "LoRA alpha unknown: s = 1 assumed, so absolute magnitudes (‖ΔW‖_F, σ, Table 7) are "
            "known only up to the factor s; ranks and φ are unaffected"
        )
    skipped = []
    items = tqdm(adapter.items(), total=len(adapter), desc="analyze", unit="module", disable=not progress)
    for name, spectrum in iter_spectra(items, device):
        result = ModuleAnalysis(name, spectrum, spectrum.metrics(taus))
        if base is not None:
            want_intruders = intruders if intruders is not None else min(spectrum.shape) <= exact_max_dim
            if intruders is None and not want_intruders:
                skipped.append(name)
            W = base.weight(name, adapter[name]).to(spectrum.Q_B)
            _compare_with_weight(
                result, W, weight_k, want_intruders, intruder_k, intruder_epsilon,
                dict(exact_max_dim=exact_max_dim, cache=cache, cache_dir=cache_dir),
            )
        analysis.modules[name] = result
    if skipped:
        analysis.notes.append(
            f"intruder dimensions skipped for {len(skipped)} module(s) with min(d_out, d_in) > "
            f"{exact_max_dim} (they need W's full SVD): pass intruders=True to compute them"
        )
    return analysis


def _compare_with_weight(
    result: ModuleAnalysis, W: torch.Tensor, weight_k: int, intruders: bool, intruder_k: int, intruder_epsilon: float, svd_options: dict
) -> None:
    """Fill `result`'s analyses against W: (d_out, d_in), from one (cached) SVD of W."""
    spectrum = result.spectrum
    k = max(weight_k, spectrum.numerical_rank)
    weight_spectrum = weight_svd(W, None if intruders else k, **svd_options)
    result.weight_spectrum = weight_spectrum.top(k)
    result.projection = projection_norms(spectrum, W, weight_spectrum=weight_spectrum)
    result.phi_vs_weight = phi_vs_weight(spectrum, weight_spectrum.top(weight_k))
    if intruders:
        result.intruders = intruder_dimensions(
            spectrum, W, intruder_k, intruder_epsilon, weight_spectrum, exact_max_dim=svd_options["exact_max_dim"]
        )
