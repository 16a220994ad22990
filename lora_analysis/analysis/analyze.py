"""One entry point for reports: spectra and rank metrics of every module, and, given the base
weights, the analyses against W (Table 7 projections, Figure 8 φ, intruder dimensions)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from ..adapters import Adapter, Update
from ..base_weights import BaseWeights
from ..errors import LoraAnalysisError
from .heap import HeapTrimmer
from .dense_svd import SvdMethod, SvdOptions
from .intruders import Intruders, intruder_dimensions
from .projection import ProjectionNorms, WeightSpectrum, phi_vs_weight, projection_norms, weight_svd
from .spectrum import DEFAULT_TAUS, ModuleSpectrum, RankMetrics, iter_spectra, with_progress


@dataclass(frozen=True)
class AnalysisOptions:
    """How `analyze_adapter` works (the `analyze` command's options).

    taus: energy thresholds τ ∈ (0, 1] of the energy ranks (smallest k with Σ_{i≤k}σ² ≥ τΣσ²).
    With base weights:
        weight_k: top-k singular vectors of W for φ against W (paper Fig. 8); W's SVD keeps
            max(weight_k, numerical rank of ΔW) of them.
        intruders: None computes intruder dimensions only where min(d_out, d_in) ≤
            exact_max_dim (they need W's full SVD: seconds there, about a minute per 4096²
            weight on 2 CPU cores, cached); True for every module, False for none.
        intruder_k, intruder_epsilon: the top-k singular vectors of W + ΔW are checked; an
            intruder has max |cos| < ε against every singular vector of W.
        exact_max_dim: W's SVD is exact when min(d_out, d_in) ≤ this, else randomized.
        cache, cache_dir: W's SVD is cached on disk (`weight_svd`).
    device: where the spectra are computed ("auto": CUDA when present).
    svd: how dense ΔW (full fine-tuning) are decomposed: "auto" (exact LAPACK below 2048 on the
        short side, else randomized with a stated bound), "exact", "randomized", or `SvdOptions`.
        The analyses against W need ΔW's exact singular vectors: a module whose randomized
        spectrum is not resolved to rounding gets none (noted).
    keep_vectors: keep each module's singular vectors in the result (`ModuleSpectrum.U`, `.V`,
        `.basis`); False releases them once the module is analysed (reports need only the
        singular values and the numbers computed per module), so a large adapter's analysis
        holds no d × r frames.
    """

    taus: Sequence[float] = DEFAULT_TAUS
    weight_k: int = 64
    intruders: bool | None = None
    intruder_k: int = 10
    intruder_epsilon: float = 0.5
    exact_max_dim: int = 1536
    cache: bool = True
    cache_dir: str | os.PathLike | None = None
    device: str | torch.device = "auto"
    keep_vectors: bool = True
    svd: SvdOptions | SvdMethod = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "taus", tuple(float(t) for t in self.taus))
        bad = [t for t in self.taus if not 0.0 < t <= 1.0]
        if bad or not self.taus:
            raise LoraAnalysisError(f"energy thresholds tau must be in (0, 1], got {list(self.taus)}")
        for name in ("weight_k", "intruder_k", "exact_max_dim"):
            if getattr(self, name) < 1:
                raise LoraAnalysisError(f"{name} must be >= 1, got {getattr(self, name)}")

    def wants_intruders(self, shape: tuple[int, int]) -> bool:
        """Whether a module of (d_out, d_in) `shape` gets intruder dimensions."""
        return self.intruders if self.intruders is not None else min(shape) <= self.exact_max_dim


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

    def __iter__(self) -> Iterator[ModuleAnalysis]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)


def analyze_adapter(
    adapter: Adapter,
    base: BaseWeights | None = None,
    options: AnalysisOptions | None = None,
    *,
    progress: bool = True,
) -> AdapterAnalysis:
    """Analyse every module of `adapter` (see `AnalysisOptions`; progress bar on stderr,
    advanced as each module's analysis completes, unless progress=False).

    Always: the exact spectrum of ΔW and its rank metrics. With `base`: W per module (read
    lazily, one at a time), its SVD (cached on disk), Table 7 projections, Figure 8 φ and
    intruder dimensions.
    """
    options = options or AnalysisOptions()
    taus = tuple(options.taus)
    analysis = AdapterAnalysis({}, taus, adapter.source, base.source if base else None, adapter.alpha_known)
    analysis.notes += adapter_notes(adapter)
    skipped, bounded = [], []
    weights: dict[str, torch.Tensor] = {}  # W read for a DoRA module's ΔW, kept for the comparisons

    def base_weight(name: str, update: Update) -> torch.Tensor:
        assert base is not None
        weights[name] = base.weight(name, update.info)
        return weights[name]

    spectra = iter_spectra(adapter.items(), options.device, base=base_weight if base is not None else None,
                           source=adapter.source, svd=options.svd)
    trim = HeapTrimmer()  # memory stays bounded over thousands of modules (see heap.py)
    for name, spectrum in with_progress(spectra, len(adapter), "analyze", progress):
        result = ModuleAnalysis(name, spectrum, spectrum.metrics(taus))
        if base is not None and not spectrum.resolved:
            bounded.append(name)
            weights.pop(name, None)
        elif base is not None:
            if options.intruders is None and not options.wants_intruders(spectrum.shape):
                skipped.append(name)
            W = weights.pop(name) if name in weights else base.weight(name, adapter.info(name))
            W = W.to(device=spectrum.device, dtype=spectrum.dtype)  # rebound: the float32 read is not kept too
            _compare_with_weight(result, W, options)
            del W
        if not options.keep_vectors:
            spectrum.release_vectors()
        trim()
        analysis.modules[name] = result
    if skipped:
        analysis.notes.append(
            f"intruder dimensions skipped for {len(skipped)} module(s) with min(d_out, d_in) > "
            f"{options.exact_max_dim} (they need W's full SVD): pass intruders=True to compute them"
        )
    if bounded:
        analysis.notes.append(
            f"no comparison with W (Table 7, φ against W, intruders) for {len(bounded)} module(s) (e.g. {bounded[0]}) "
            "decomposed by a randomized SVD: they need ΔW's exact singular vectors, which its bound does not give "
            "(--svd exact computes them)")
    return analysis


def adapter_notes(adapter: Adapter) -> list[str]:
    """What every report of `adapter` must say: how its reader settled open questions of the
    format, unknown α, and DoRA modules read as their direction update alone."""
    notes = list(adapter.notes)
    if not adapter.alpha_known:
        notes.append(
            "LoRA alpha unknown: s = 1 assumed, so absolute magnitudes (‖ΔW‖_F, σ, Table 7) are "
            "known only up to the factor s; ranks and φ are unaffected"
        )
    directions = adapter.kinds.get("dora-direction", 0)
    if directions:
        notes.append(f"{directions} DoRA module(s) analysed as their direction update s·B·A alone, as asked "
                     "(--dora-direction): not their ΔW, which needs the base weights")
    return notes


def _compare_with_weight(result: ModuleAnalysis, W: torch.Tensor, options: AnalysisOptions) -> None:
    """Fill `result`'s analyses against W: (d_out, d_in), from one (cached) SVD of W."""
    spectrum = result.spectrum
    intruders = options.wants_intruders(spectrum.shape)
    k = max(options.weight_k, spectrum.numerical_rank)
    weight_spectrum = weight_svd(
        W, None if intruders else k, exact_max_dim=options.exact_max_dim, cache=options.cache, cache_dir=options.cache_dir
    )
    result.weight_spectrum = weight_spectrum.top(k)
    result.projection = projection_norms(spectrum, W, weight_spectrum=weight_spectrum)
    result.phi_vs_weight = phi_vs_weight(spectrum, weight_spectrum.top(options.weight_k))
    if intruders:
        # a weight with fewer than intruder_k singular vectors (BERT's 2 × d token-type embeddings)
        # has all of them checked; the result records the k used
        result.intruders = intruder_dimensions(
            spectrum, W, min(options.intruder_k, min(spectrum.shape)), options.intruder_epsilon, weight_spectrum,
            exact_max_dim=options.exact_max_dim,
        )
