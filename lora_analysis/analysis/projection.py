"""ΔW against the pretrained W: W's singular vectors, Table 7 projections, Figure 8 φ.

Paper Table 7 (Hu et al. 2021, Sec. 7.3): ‖Uᵀ W V‖_F with U, V the top-r left/right singular
vectors of ΔW, of W, or random orthonormal; amplification factor ‖ΔW‖_F / ‖U_ΔᵀWV_Δ‖_F.
Paper Figure 8: φ between W's top-i left singular vectors and ΔW's top-j.

W: (d_out, d_in) in the Linear orientation (`BaseWeights` transposes GPT-2 Conv1D weights).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .spectrum import ModuleSpectrum


@dataclass
class WeightSpectrum:
    """Top-k (or full thin) SVD of a pretrained weight W ≈ U diag(S) Vᵀ.

    U: (d_out, k), S: (k,) float64 descending, V: (d_in, k).
    exact: True for a full LAPACK SVD; False for the randomized one, whose accuracy is stated
    by residuals[i] = ‖W vᵢ − σᵢ uᵢ‖₂ / σ₁ (Wᵀuᵢ = σᵢvᵢ holds exactly by construction): each
    σᵢ is within residuals[i]·σ₁ of a true singular value of W.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    exact: bool
    residuals: torch.Tensor

    @property
    def k(self) -> int:
        return self.S.numel()

    @property
    def max_residual(self) -> float:
        return float(self.residuals.max()) if self.k else 0.0


def default_cache_dir() -> Path:
    """`$LORA_ANALYSIS_CACHE`, else `$XDG_CACHE_HOME/lora_analysis`, else `~/.cache/lora_analysis`."""
    if os.environ.get("LORA_ANALYSIS_CACHE"):
        return Path(os.environ["LORA_ANALYSIS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_analysis"


def weight_svd(
    W: torch.Tensor,
    k: int | None = None,
    *,
    exact_max_dim: int = 1536,
    oversample: int | None = None,
    power_iterations: int = 4,
    seed: int = 0,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> WeightSpectrum:
    """SVD of W: (d_out, d_in), top-k (k=None: the full thin SVD, always exact).

    Exact (float64 LAPACK) when min(d_out, d_in) ≤ exact_max_dim or k=None; otherwise
    randomized (Halko, Martinsson & Tropp 2011): a Gaussian sketch of k + oversample columns
    (oversample defaults to max(2k, 10)), `power_iterations` (≥ 4) re-orthonormalized power
    iterations, in float32 (float64 for float64 W), accuracy in `residuals`. Cached on disk
    under `cache_dir` (default `default_cache_dir()/weight_svd`) keyed by a SHA-256 of W's bytes
    and the parameters; written atomically.
    """
    raise NotImplementedError


@dataclass
class ProjectionNorms:
    """Paper Table 7 for one module at rank r.

    delta / weight / random: ‖UᵀWV‖_F with U: (d_out, r), V: (d_in, r) the top-r singular
    vectors of ΔW, of W, or random orthonormal (seeded). weight_norm ‖W‖_F; delta_norm ‖ΔW‖_F;
    amplification = delta_norm / delta (NaN when delta = 0); random_expected = r‖W‖_F/√(d_out·d_in).
    """

    r: int
    delta: float
    weight: float
    random: float
    weight_norm: float
    delta_norm: float
    amplification: float
    random_expected: float


def projection_norms(
    spectrum: ModuleSpectrum,
    W: torch.Tensor,
    r: int | None = None,
    seed: int = 0,
    weight_spectrum: WeightSpectrum | None = None,
) -> ProjectionNorms:
    """Table 7 numbers for ΔW (from `spectrum`) against W: (d_out, d_in).

    r defaults to ΔW's numerical rank (directions beyond it are arbitrary). W's top-r singular
    vectors come from `weight_spectrum` when given (needs k ≥ r), else from `weight_svd(W, r)`.
    """
    raise NotImplementedError


def phi_vs_weight(spectrum: ModuleSpectrum, weight_spectrum: WeightSpectrum) -> np.ndarray:
    """Paper Fig. 8: φ(i, j) between W's top-i and ΔW's top-j left singular vectors.

    Returns (k_W, m): grid[i-1, j-1] = φ(i, j); NaN for j beyond ΔW's numerical rank.
    """
    raise NotImplementedError
