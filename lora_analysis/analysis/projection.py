"""ΔW against the pretrained W: W's singular vectors, Table 7 projections, Figure 8 φ.

Paper Table 7 (Hu et al. 2021, Sec. 7.3): ‖Uᵀ W V‖_F with U, V the top-r left/right singular
vectors of ΔW, of W, or random orthonormal; amplification factor ‖ΔW‖_F / ‖U_ΔᵀWV_Δ‖_F.
Paper Figure 8: φ between W's top-i left singular vectors and ΔW's top-j.

W: (d_out, d_in) in the Linear orientation (`BaseWeights` transposes GPT-2 Conv1D weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import LoraAnalysisError
from ..fileio import atomic_write
from ..seeding import random_basis, seeded_generator
from .similarity import subspace_similarity
from .spectrum import ModuleSpectrum, numerical_rank, rank_tolerance

CACHE_VERSION = 1


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

    def top(self, k: int) -> "WeightSpectrum":
        """The first k singular triplets (all of them when k ≥ self.k), as compact copies: a
        view would keep the whole (d, d) storage of a full SVD alive (134 MB at 4096²)."""

        def compact(t: torch.Tensor) -> torch.Tensor:
            return t.clone(memory_format=torch.contiguous_format)

        return WeightSpectrum(
            compact(self.U[:, :k]), compact(self.S[:k]), compact(self.V[:, :k]), self.exact, compact(self.residuals[:k])
        )


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
    W = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    params: dict[str, Any]
    compute: Callable[[], WeightSpectrum]
    if k is None or min(W.shape) <= exact_max_dim:
        params = {"method": "exact"}  # one cache entry serves every k
        compute = partial(_exact_svd, W)
    else:
        oversample = max(2 * k, 10) if oversample is None else oversample
        if power_iterations < 4 or oversample < 2 * k:
            raise LoraAnalysisError(f"randomized SVD needs oversample ≥ 2k and ≥ 4 power iterations, got {oversample}, {power_iterations}")
        params = {"method": "randomized", "k": k, "oversample": oversample, "power_iterations": power_iterations, "seed": seed}
        width = min(k + oversample, min(W.shape))
        compute = partial(randomized_svd, W.__matmul__, W.T.__matmul__, W.shape[1], k, width, power_iterations,
                          seeded_generator(seed), W)
    path = _cache_path(W, params, cache_dir) if cache else None
    result = _load_cached(path, W.device) if path else None
    if result is None:
        result = compute()
        if path:
            _save_cached(path, result)
    return result if k is None else result.top(k)


def _exact_svd(W: torch.Tensor) -> WeightSpectrum:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return WeightSpectrum(U.to(W.dtype), S, Vh.T.to(W.dtype), exact=True, residuals=torch.zeros_like(S))


def randomized_svd(
    matmul: Callable[[torch.Tensor], torch.Tensor],
    rmatmul: Callable[[torch.Tensor], torch.Tensor],
    d_in: int,
    k: int,
    width: int,
    power_iterations: int,
    generator: torch.Generator,
    like: torch.Tensor,
) -> WeightSpectrum:
    """Top-k SVD of an operator X ↦ M X, Y ↦ Mᵀ Y, M: (d_out, d_in), never materialized.

    Range finder on a Gaussian sketch of `width` columns with re-orthonormalized power
    iterations, then Rayleigh–Ritz: M ≈ Q (QᵀM), U = Q Ũ. Computed in `like`'s dtype and device.
    """
    sketch = torch.randn(d_in, width, generator=generator, dtype=torch.float64).to(like)
    Q = torch.linalg.qr(matmul(sketch)).Q
    for _ in range(power_iterations):
        Q = torch.linalg.qr(matmul(torch.linalg.qr(rmatmul(Q)).Q)).Q
    small = rmatmul(Q).T.double()  # QᵀM: (width, d_in)
    U_small, S, Vh = torch.linalg.svd(small, full_matrices=False)
    U = Q @ U_small[:, :k].to(like.dtype)
    V = Vh[:k].T.to(like.dtype)
    S = S[:k]
    # Mᵀuᵢ = σᵢvᵢ exactly by construction; the error sits in M vᵢ − σᵢuᵢ = (I − QQᵀ) M vᵢ.
    residuals = torch.linalg.vector_norm(matmul(V).double() - U.double() * S, dim=0) / S[0].clamp_min(torch.finfo(torch.float64).tiny)
    return WeightSpectrum(U, S, V, exact=False, residuals=residuals)


def _cache_path(W: torch.Tensor, params: dict, cache_dir: str | os.PathLike | None) -> Path:
    digest = hashlib.sha256(json.dumps({**params, "version": CACHE_VERSION, "dtype": str(W.dtype), "shape": list(W.shape)}, sort_keys=True).encode())
    digest.update(W.detach().cpu().contiguous().numpy().data)  # the bytes, without a copy
    return Path(cache_dir or default_cache_dir()) / "weight_svd" / f"{digest.hexdigest()}.safetensors"


def _load_cached(path: Path, device: torch.device) -> WeightSpectrum | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            exact = f.metadata()["exact"] == "true"
            t = {name: f.get_tensor(name).to(device) for name in ("U", "S", "V", "residuals")}
    except Exception:  # noqa: BLE001 — an unreadable cache entry is recomputed and overwritten
        return None
    return WeightSpectrum(t["U"], t["S"], t["V"], exact=exact, residuals=t["residuals"])


def _save_cached(path: Path, result: WeightSpectrum) -> None:
    tensors = {name: getattr(result, name).detach().cpu().contiguous() for name in ("U", "S", "V", "residuals")}
    metadata = {"exact": "true" if result.exact else "false"}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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
    r = spectrum.numerical_rank if r is None else r
    if W.shape != spectrum.shape:
        raise LoraAnalysisError(f"W has shape {tuple(W.shape)}, ΔW has (d_out, d_in) = {spectrum.shape}")
    if not 0 <= r <= spectrum.S.numel():
        raise LoraAnalysisError(f"projection rank r={r} outside [0, {spectrum.S.numel()}]")
    if weight_spectrum is None or weight_spectrum.k < r:
        weight_spectrum = weight_svd(W, r)
    W = W.to(device=spectrum.device, dtype=spectrum.dtype)
    generator = seeded_generator(seed)
    random_U, random_V = random_basis(W.shape[0], r, generator), random_basis(W.shape[1], r, generator)
    delta = _projected_norm(W, spectrum.U[:, :r], spectrum.V[:, :r])
    weight_norm = float(torch.linalg.matrix_norm(W.double()))
    delta_norm = spectrum.frobenius_norm
    return ProjectionNorms(
        r=r,
        delta=delta,
        weight=_projected_norm(W, weight_spectrum.U[:, :r], weight_spectrum.V[:, :r]),
        random=_projected_norm(W, random_U, random_V),
        weight_norm=weight_norm,
        delta_norm=delta_norm,
        amplification=delta_norm / delta if delta > 0 else float("nan"),
        random_expected=r * weight_norm / math.sqrt(W.shape[0] * W.shape[1]),
    )


def _projected_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F, U: (d_out, r), V: (d_in, r)."""
    U, V = U.to(W), V.to(W)
    return float(torch.linalg.matrix_norm((U.T @ W @ V).double()))


def phi_vs_weight(spectrum: ModuleSpectrum, weight_spectrum: WeightSpectrum) -> np.ndarray:
    """Paper Fig. 8: φ(i, j) between W's top-i and ΔW's top-j left singular vectors.

    Returns (k_W, m): grid[i-1, j-1] = φ(i, j); NaN beyond either numerical rank.
    """
    U_W = weight_spectrum.U
    if U_W.shape[0] != spectrum.d_out:
        raise LoraAnalysisError(f"W's left singular vectors have dimension {U_W.shape[0]}, ΔW's d_out is {spectrum.d_out}")
    dim = max(U_W.shape[0], weight_spectrum.V.shape[0])
    weight_rank = numerical_rank(weight_spectrum.S, rank_tolerance(weight_spectrum.S, dim, torch.finfo(U_W.dtype).eps))
    return subspace_similarity(U_W, spectrum.U.to(U_W), weight_rank, spectrum.numerical_rank)
