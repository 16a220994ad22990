"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228).

Among the top-k left singular vectors y_j of W + ΔW, an intruder is one whose largest |cosine|
with every left singular vector x_i of W is below ε:  max_i |x_iᵀ y_j| < ε.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .projection import WeightSpectrum
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
) -> Intruders:
    """Intruder dimensions of W + ΔW, W: (d_out, d_in), ΔW from `spectrum`.

    `weight_spectrum` must be W's full thin SVD (`weight_svd(W)`, cached); computed when None.
    """
    raise NotImplementedError
