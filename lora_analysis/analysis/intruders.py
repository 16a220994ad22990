"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228).

Among the top-k left singular vectors y_j of W + ΔW, an intruder is one whose largest |cosine|
with every left singular vector x_i of W is below ε:  max_i |x_iᵀ y_j| < ε.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LoraAnalysisError
from ..seeding import seeded_generator
from .projection import WeightSpectrum, randomized_svd, weight_svd
from .spectrum import ModuleSpectrum


@dataclass
class Intruders:
    """Intruder dimensions of one module.

    singular_values: (k,) top-k of W + ΔW; max_cos: (k,) max_i |cos(y_j, x_i)| over W's left
    singular vectors x_i (all of them: the full thin SVD of W); is_intruder: (k,) max_cos < ε.
    exact: whether W + ΔW's top-k came from an exact SVD (else randomized on the implicit
    operator W + U diag(S) Vᵀ, with residual stated like `WeightSpectrum.residuals`).
    """

    k: int
    epsilon: float
    singular_values: np.ndarray
    max_cos: np.ndarray
    is_intruder: np.ndarray
    exact: bool
    max_residual: float

    @property
    def count(self) -> int:
        return int(self.is_intruder.sum())


def intruder_dimensions(
    spectrum: ModuleSpectrum,
    W: torch.Tensor,
    k: int = 10,
    epsilon: float = 0.5,
    weight_spectrum: WeightSpectrum | None = None,
    seed: int = 0,
    exact_max_dim: int = 1536,
) -> Intruders:
    """Intruder dimensions of W + ΔW, W: (d_out, d_in), ΔW from `spectrum`.

    `weight_spectrum` must be W's full thin SVD (`weight_svd(W)`, cached); computed when None.
    W + ΔW's top-k: exact SVD of the materialized sum when min(d_out, d_in) ≤ exact_max_dim,
    else randomized on the implicit operator X ↦ W X + U (S ∘ VᵀX) (never formed).
    """
    if W.shape != spectrum.shape:
        raise LoraAnalysisError(f"W has shape {tuple(W.shape)}, ΔW has (d_out, d_in) = {spectrum.shape}")
    if not 0 < k <= min(W.shape):
        raise LoraAnalysisError(f"intruder top-k must be in [1, {min(W.shape)}], got {k}")
    if weight_spectrum is None:
        weight_spectrum = weight_svd(W)
    if not weight_spectrum.exact or weight_spectrum.k < min(W.shape):
        raise LoraAnalysisError("intruder dimensions need the full thin SVD of W: pass weight_svd(W) (k=None)")
    W = W.to(device=spectrum.device, dtype=spectrum.dtype)
    tuned = _top_singular(spectrum, W, k, exact_max_dim, seed)
    max_cos = (weight_spectrum.U.to(W).T @ tuned.U).abs().amax(dim=0).double().cpu().numpy()
    return Intruders(
        k=k,
        epsilon=epsilon,
        singular_values=tuned.S.cpu().numpy(),
        max_cos=max_cos,
        is_intruder=max_cos < epsilon,
        exact=tuned.exact,
        max_residual=tuned.max_residual,
    )


def _top_singular(spectrum: ModuleSpectrum, W: torch.Tensor, k: int, exact_max_dim: int, seed: int) -> WeightSpectrum:
    """Top-k SVD of W + ΔW = W + U diag(S) Vᵀ."""
    U, V = spectrum.U, spectrum.V
    S = spectrum.S.to(U)
    if min(W.shape) <= exact_max_dim:
        tuned = (U * S) @ V.T
        tuned += W  # W + ΔW without a third (d_out, d_in) buffer, bit for bit the sum W + ΔW
        return weight_svd(tuned, cache=False).top(k)
    width = min(3 * k, min(W.shape))  # oversampling 2k, as for W itself
    return randomized_svd(
        lambda X: W @ X + U @ (S[:, None] * (V.T @ X)),
        lambda Y: W.T @ Y + V @ (S[:, None] * (U.T @ Y)),
        W.shape[1], k, width, power_iterations=8, generator=seeded_generator(seed), like=W,
    )
