"""The numbers of Section 7, computed from the trained sweep.

Figure 3: φ(A_{r=8}, A_{r=64}, i, j) per projection at one layer (Figure 6: every layer).
Figure 4: φ(A_{r=64, seed 0}, A_{r=64, seed 1}, i, j), plus two random Gaussian matrices
(Figure 7: every layer). Figure 8: φ between W_q's top-i and ΔW_q's top-j left singular
vectors for r = 4, 8, 64 and a random matrix. Table 7: ‖UᵀW_qV‖_F with U, V from ΔW_q, W_q or
random at r = 4 and 64. Table 6 (rank table): validation accuracy by rank and target set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..analysis import (
    Comparison,
    ModuleSpectrum,
    ProjectionNorms,
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
from ..base_weights import BaseWeights
from ..training.models import resolve_model
from .experiment import Runs

FIG8_RANKS = (4, 8, 64)
TABLE7_RANKS = (4, 64)
RANDOM_SEED = 0


@dataclass
class Section7:
    """Lazily computed results of Section 7 for a trained sweep."""

    runs: Runs
    _spectra: dict = field(default_factory=dict, repr=False)

    @property
    def targets(self) -> list[str]:
        return self.runs.config.targets

    @property
    def seeds(self) -> tuple[int, int]:
        return self.runs.config.seeds[0], self.runs.config.seeds[1]

    def spectrum(self, r: int, seed: int, target: str, layer: int) -> ModuleSpectrum:
        key = (r, seed)
        if key not in self._spectra:
            self._spectra[key] = adapter_spectra(self.runs.adapter(r, seed), progress=False)
        adapter = self.runs.adapter(r, seed)
        return self._spectra[key][self.runs.module_name(adapter, target, layer)]

    # Figures 3/6 and 4/7 -------------------------------------------------------------------
    def rank_comparison(self, target: str, layer: int) -> Comparison:
        """φ(A_{r=8}, A_{r=64}): grid (8, 64)."""
        s0 = self.seeds[0]
        return compare_modules(self.spectrum(8, s0, target, layer), self.spectrum(64, s0, target, layer), "A")

    def seed_comparison(self, target: str, layer: int) -> Comparison:
        """φ(A_{r=64, seed a}, A_{r=64, seed b}): grid (64, 64)."""
        a, b = self.seeds
        return compare_modules(self.spectrum(64, a, target, layer), self.spectrum(64, b, target, layer), "A")

    def random_grid(self, target: str, layer: int) -> np.ndarray:
        """φ between the row spaces of two random Gaussian (64, d_in) matrices (Fig. 4, right)."""
        return random_reference_grid(self.spectrum(64, self.seeds[0], target, layer).d_in, 64, 64, RANDOM_SEED)

    # Figure 8 and Table 7: against the pretrained W_q ----------------------------------------
    @cached_property
    def base(self) -> BaseWeights:
        return BaseWeights(resolve_model(self.runs.config.model)[0])

    def weight(self, target: str, layer: int):
        adapter = self.runs.adapter(64, self.seeds[0])
        name = self.runs.module_name(adapter, target, layer)
        return self.base.weight(name, adapter[name])

    def weight_vs_delta(self, target: str, layer: int) -> dict[str, np.ndarray]:
        """{"r=4": grid (d_out, 4), "r=8": ..., "r=64": ..., "random": (d_out, 64)}: φ(W top-i, ΔW top-j)."""
        W = self.weight(target, layer)
        w_svd = weight_svd(W)
        grids = {f"r={r}": phi_vs_weight(self.spectrum(r, self.seeds[0], target, layer), w_svd) for r in FIG8_RANKS}
        random_U = random_basis(W.shape[0], 64, seeded_generator(RANDOM_SEED)).to(w_svd.U)
        grids["random"] = subspace_similarity(w_svd.U, random_U)
        return grids

    def projections(self, target: str, layer: int) -> dict[int, ProjectionNorms]:
        """Table 7 at r = 4 and r = 64 (seed 0): ‖UᵀWV‖_F for ΔW's, W's and random directions."""
        W = self.weight(target, layer)
        w_svd = weight_svd(W, max(TABLE7_RANKS))  # once: W is hashed for the cache on every call
        return {r: projection_norms(self.spectrum(r, self.seeds[0], target, layer), W, r=r, seed=RANDOM_SEED,
                                    weight_spectrum=w_svd) for r in TABLE7_RANKS}

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
