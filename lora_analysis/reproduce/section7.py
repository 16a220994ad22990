"""The numbers of Section 7, computed from the trained sweep.

Figure 3: φ(A_{r=8}, A_{r=64}, i, j) per projection at one layer (Figure 6: every layer).
Figure 4: φ(A_{r=64, seed 0}, A_{r=64, seed 1}, i, j), plus two random Gaussian matrices
(Figure 7: every layer). Figure 8: φ between W_q's top-i and ΔW_q's top-j left singular
vectors for r = 4, 8, 64 and a random matrix. Table 7: ‖UᵀW_qV‖_F with U, V from ΔW_q, W_q or
random at r = 4 and 64. Table 6 (rank table): validation accuracy by rank and target set.

Random baselines are distributions: `null_frames` holds seeded Haar-random frames from which
the null of ‖UᵀWV‖_F (per layer) and quantile grids of φ are drawn (`analysis.nulls`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..analysis import (
    Comparison,
    ModuleSpectrum,
    ProjectionNorms,
    WeightSpectrum,
    adapter_spectra,
    compare_modules,
    phi_vs_weight,
    projection_norms,
    random_basis,
    random_reference_grid,
    seeded_generator,
    subspace_similarity,
    weight_svd,
)
from ..analysis.nulls import haar_frames, phi_null_band, projection_null_samples
from ..base_weights import BaseWeights
from ..training.models import resolve_model
from .experiment import Runs

FIG8_RANKS = (4, 8, 64)
TABLE7_RANKS = (4, 64)
RANDOM_SEED = 0  # the random panels of Figures 4 and 8 (one picture of what chance looks like)
NULL_STREAMS = ("U", "V")  # the two independent sets of Haar frames behind every null (seeding contexts)
NULL_BAND_LEVEL = 0.99  # φ heatmaps outline where φ leaves a band that a random grid crosses in 1 % of draws


def short(target: str) -> str:
    """"query" → "q", as in ΔW_q."""
    return {"query": "q", "key": "k", "value": "v", "dense": "o"}.get(target, target)


@dataclass
class Section7:
    """Lazily computed results of Section 7 for a trained sweep."""

    runs: Runs
    _spectra: dict = field(default_factory=dict, repr=False)
    _frames: dict = field(default_factory=dict, repr=False)
    _projection_nulls: dict = field(default_factory=dict, repr=False)
    _projections: dict = field(default_factory=dict, repr=False)
    _weight_spectra: dict = field(default_factory=dict, repr=False)
    _bands: dict = field(default_factory=dict, repr=False)

    @property
    def targets(self) -> list[str]:
        return self.runs.config.targets

    @property
    def seeds(self) -> tuple[int, int]:
        return self.runs.config.seeds[0], self.runs.config.seeds[1]

    @property
    def units(self) -> list[tuple[int, int]]:
        """(layer, seed) of every adapter module the verdicts pool: all layers × both seeds."""
        return [(layer, seed) for layer in self.runs.layers for seed in self.seeds]

    def spectrum(self, r: int, seed: int, target: str, layer: int) -> ModuleSpectrum:
        key = (r, seed)
        if key not in self._spectra:
            self._spectra[key] = adapter_spectra(self.runs.adapter(r, seed), progress=False)
        adapter = self.runs.adapter(r, seed)
        return self._spectra[key][self.runs.module_name(adapter, target, layer)]

    # Figures 3/6 and 4/7 -------------------------------------------------------------------
    def rank_comparison(self, target: str, layer: int, seed: int | None = None) -> Comparison:
        """φ(A_{r=8}, A_{r=64}) of one seed (default: the first): grid (8, 64)."""
        seed = self.seeds[0] if seed is None else seed
        return compare_modules(self.spectrum(8, seed, target, layer), self.spectrum(64, seed, target, layer), "A")

    def seed_comparison(self, target: str, layer: int) -> Comparison:
        """φ(A_{r=64, seed a}, A_{r=64, seed b}): grid (64, 64)."""
        a, b = self.seeds
        return compare_modules(self.spectrum(64, a, target, layer), self.spectrum(64, b, target, layer), "A")

    def random_grid(self, target: str, layer: int) -> np.ndarray:
        """φ between the row spaces of two random Gaussian (64, d_in) matrices (Fig. 4, right)."""
        return random_reference_grid(self.spectrum(64, self.seeds[0], target, layer).d_in, 64, 64, RANDOM_SEED)

    # Figure 8 and Table 7: against the pretrained W ------------------------------------------
    @cached_property
    def base(self) -> BaseWeights:
        return BaseWeights(resolve_model(self.runs.config.model)[0])

    def weight(self, target: str, layer: int) -> torch.Tensor:
        """The pretrained W of `target` in `layer`: (d_out, d_in)."""
        adapter = self.runs.adapter(64, self.seeds[0])
        name = self.runs.module_name(adapter, target, layer)
        return self.base.weight(name, adapter[name])

    def weight_spectrum(self, target: str, layer: int) -> WeightSpectrum:
        """W's full thin SVD (exact; cached here and on disk by `weight_svd`)."""
        if (target, layer) not in self._weight_spectra:
            self._weight_spectra[(target, layer)] = weight_svd(self.weight(target, layer))
        return self._weight_spectra[(target, layer)]

    def weight_vs_delta(self, target: str, layer: int) -> dict[str, np.ndarray]:
        """{"r=4": grid (d_out, 4), "r=8": ..., "r=64": ..., "random": (d_out, 64)}: φ(W top-i, ΔW top-j)."""
        w_svd = self.weight_spectrum(target, layer)
        grids = {f"r={r}": phi_vs_weight(self.spectrum(r, self.seeds[0], target, layer), w_svd) for r in FIG8_RANKS}
        random_U = random_basis(w_svd.U.shape[0], 64, seeded_generator(RANDOM_SEED)).to(w_svd.U)
        grids["random"] = subspace_similarity(w_svd.U, random_U)
        return grids

    def projections(self, target: str, layer: int, seed: int | None = None) -> dict[int, ProjectionNorms]:
        """Table 7 at r = 4 and r = 64 (default: the first seed): ‖UᵀWV‖_F for ΔW's, W's and
        (one draw of) random directions; the random baseline proper is `projection_null`."""
        key = (target, layer, self.seeds[0] if seed is None else seed)
        if key not in self._projections:
            W, w_svd = self.weight(target, layer), self.weight_spectrum(target, layer)
            self._projections[key] = {
                r: projection_norms(self.spectrum(r, key[2], target, layer), W, r=r, seed=RANDOM_SEED, weight_spectrum=w_svd)
                for r in TABLE7_RANKS}
        return self._projections[key]

    # Null distributions -------------------------------------------------------------------------
    @property
    def null_draws(self) -> int:
        draws = self.runs.config.null_draws
        assert draws is not None  # ReproduceConfig sets it
        return draws

    def null_frames(self, d: int, which: str) -> torch.Tensor:
        """`null_draws` Haar-random frames (d, 64) of set `which` (one of `NULL_STREAMS`: independent)."""
        key = (d, which)
        if key not in self._frames:
            generator = seeded_generator(RANDOM_SEED, "null frames", which, d)
            self._frames[key] = haar_frames(d, max(TABLE7_RANKS + FIG8_RANKS), self.null_draws, generator)
        return self._frames[key]

    def projection_null(self, target: str, layer: int, r: int) -> np.ndarray:
        """`null_draws` draws of ‖UᵀWV‖_F for Haar-random U: (d_out, r), V: (d_in, r): (N,)."""
        key = (target, layer, r)
        if key not in self._projection_nulls:
            W = self.weight_spectrum(target, layer)
            d_out, d_in = W.U.shape[0], W.V.shape[0]
            self._projection_nulls[key] = projection_null_samples(
                W.S.numpy(), self.null_frames(d_out, "U"), self.null_frames(d_in, "V"), r)
        return self._projection_nulls[key]

    def phi_band(self, d: int, k1: int, k2: int) -> np.ndarray:
        """(2, k1, k2): the simultaneous `NULL_BAND_LEVEL` band of φ(i, j) for random subspaces of Rᵈ."""
        if (d, k1, k2) not in self._bands:
            self._bands[(d, k1, k2)] = phi_null_band(self.null_frames(d, "U"), k1, k2, NULL_BAND_LEVEL)
        return self._bands[(d, k1, k2)]

    # Table 6: accuracy by rank -------------------------------------------------------------
    def rank_table(self) -> list[dict]:
        """Per target set and rank: validation accuracy per seed, mean and half-range."""
        rows = []
        config = self.runs.config
        for targets in config.target_sets:
            for r in config.ranks:
                accuracies = [self.runs.metrics(r, seed, targets)["final"]["val_accuracy"] for seed in config.seeds]
                rows.append({
                    "targets": targets,
                    "r": r,
                    "accuracy": accuracies,
                    "mean": float(np.mean(accuracies)),
                    "spread": float((max(accuracies) - min(accuracies)) / 2),
                })
        return rows
