"""What random directions give: the null distributions behind Section 7's verdicts and charts.

Closed forms:

- φ(i, 1) between a fixed i-dimensional subspace of Rᵈ and an independent uniformly random
  direction u is ‖P_i u‖² ~ Beta(i/2, (d − i)/2) (`phi_column_null`); φ(1, 1) of two
  independent random directions is Beta(1/2, (d − 1)/2), mean 1/d.
- X² = ‖UᵀWV‖²_F for independent Haar-random U: (d_out, r), V: (d_in, r) and W: (d_out, d_in)
  with singular values σ (`projection_null_moments`): with P = UUᵀ, Q = VVᵀ, a uniformly random
  rank-r projection in Rⁿ has E[P_ij P_kl] = a δ_ij δ_kl + b (δ_ik δ_jl + δ_il δ_jk),
  b = r(n − r) / (n(n − 1)(n + 2)), a = r²/n² − 2b/n (from P² = P and (tr P)² = r²). Then
      E X²  = r² Σσ² / (d_out d_in)
      E X⁴  = a₁(a₂ s₂² + 2 b₂ s₄) + 2 b₁((a₂ + b₂) s₄ + b₂ s₂²),   s₂ = Σσ², s₄ = Σσ⁴,
  with (a₁, b₁) for n = d_out and (a₂, b₂) for n = d_in; Var X² = E X⁴ − (E X²)².

Monte Carlo (`haar_frames`): batches of Haar-random orthonormal frames, from which
`projection_null_samples` draws ‖UᵀWV‖_F for any W (through its singular values: the law is
invariant under W → O₁ W O₂) and `phi_null_band` gives a simultaneous band for φ(i, j) grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LoraAnalysisError
from ..seeding import random_basis
from .similarity import phi_grid

FRAMES_PER_CHUNK = 128  # bounds the float64 working memory of `haar_frames`


@dataclass(frozen=True)
class BetaLaw:
    """The Beta(a, b) distribution in float64: cdf and sf through the regularized incomplete
    beta function I_x(a, b) (Lentz's continued fraction, on the side where it converges fast),
    ppf by bisection on the cdf."""

    a: float
    b: float

    def mean(self) -> float:
        return self.a / (self.a + self.b)

    def cdf(self, x: float | np.ndarray) -> float | np.ndarray:
        return _map(lambda v: _regularized_beta(v, self.a, self.b), x)

    def sf(self, x: float | np.ndarray) -> float | np.ndarray:
        return _map(lambda v: _regularized_beta(1.0 - v, self.b, self.a), x)

    def ppf(self, q: float) -> float:
        """The q-quantile: the x with cdf(x) = q, to the last bit bisection can resolve."""
        if not 0.0 <= q <= 1.0:
            raise LoraAnalysisError(f"a quantile needs 0 ≤ q ≤ 1, got {q}")
        low, high = 0.0, 1.0
        while True:
            middle = 0.5 * (low + high)
            if middle in (low, high):
                return middle
            if _regularized_beta(middle, self.a, self.b) < q:
                low = middle
            else:
                high = middle


def _map(f, x: float | np.ndarray) -> float | np.ndarray:
    if np.ndim(x) == 0:
        return f(float(x))
    return np.vectorize(f, otypes=[float])(x)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = P(Beta(a, b) ≤ x), a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, tiny: float = 1e-300) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converged to float64 precision."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return result
    raise LoraAnalysisError(f"incomplete beta I_{x}({a}, {b}) did not converge")


def phi_column_null(i: int, d: int) -> BetaLaw:
    """The law of φ(i, 1) (a fixed i-subspace of Rᵈ against a random direction):
    Beta(i/2, (d − i)/2); i = 1 is φ(1, 1) of two random directions."""
    if not 1 <= i < d:
        raise LoraAnalysisError(f"φ(i, 1) null needs 1 ≤ i < d, got i={i}, d={d}")
    return BetaLaw(i / 2, (d - i) / 2)


def _projection_moments(n: int, r: int) -> tuple[float, float]:
    """(a, b) of E[P_ij P_kl] for a uniformly random rank-r projection P in Rⁿ (module docstring)."""
    if n == 1:
        return float(r), 0.0
    b = r * (n - r) / (n * (n - 1) * (n + 2))
    return r * r / (n * n) - 2 * b / n, b


def projection_null_moments(singular_values, d_out: int, d_in: int, r: int) -> tuple[float, float]:
    """(E X², Var X²) of X = ‖UᵀWV‖_F for Haar-random U: (d_out, r), V: (d_in, r) (closed form).

    singular_values: W's σ (all of them; zeros may be left out).
    """
    if not 0 <= r <= min(d_out, d_in):
        raise LoraAnalysisError(f"projection rank r={r} outside [0, {min(d_out, d_in)}]")
    s = np.asarray(singular_values, dtype=np.float64)
    s2, s4 = float(np.sum(s**2)), float(np.sum(s**4))
    a1, b1 = _projection_moments(d_out, r)
    a2, b2 = _projection_moments(d_in, r)
    mean = r * r * s2 / (d_out * d_in)
    fourth = a1 * (a2 * s2 * s2 + 2 * b2 * s4) + 2 * b1 * ((a2 + b2) * s4 + b2 * s2 * s2)
    return mean, max(fourth - mean * mean, 0.0)


def haar_frames(d: int, k: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent Haar-random orthonormal frames: (count, d, k) float32, drawn with
    `seeding.random_basis` in chunks of `FRAMES_PER_CHUNK` from `generator` (one stream)."""
    if not 1 <= k <= d or count < 1:
        raise LoraAnalysisError(f"haar_frames needs 1 ≤ k ≤ d and count ≥ 1, got d={d}, k={k}, count={count}")
    out = torch.empty(count, d, k, dtype=torch.float32)
    for start in range(0, count, FRAMES_PER_CHUNK):
        stop = min(start + FRAMES_PER_CHUNK, count)
        out[start:stop] = random_basis(d, k, generator, count=stop - start).float()
    return out


def projection_null_samples(singular_values, U_frames: torch.Tensor, V_frames: torch.Tensor, r: int) -> np.ndarray:
    """Draws of ‖UᵀWV‖_F, (count,) float64, U, V the first r columns of the frames.

    U_frames: (count, d_out, k), V_frames: (count, d_in, k), k ≥ r, independent; W enters
    through its singular values σ (the law of UᵀWV equals that of UᵀΣV, Σ = diag(σ) padded).
    """
    count, d_out, k_u = U_frames.shape
    _, d_in, k_v = V_frames.shape
    if V_frames.shape[0] != count or r > min(k_u, k_v):
        raise LoraAnalysisError(f"frames {tuple(U_frames.shape)} and {tuple(V_frames.shape)} cannot give r={r}")
    sigma = torch.as_tensor(np.asarray(singular_values, dtype=np.float64))
    m = sigma.numel()
    if m > min(d_out, d_in):
        raise LoraAnalysisError(f"{m} singular values for a ({d_out}, {d_in}) weight")
    U = U_frames[:, :m, :r].double() * sigma[None, :, None]
    core = U.mT @ V_frames[:, :m, :r].double()  # (count, r, r) = UᵀΣV
    return torch.linalg.matrix_norm(core).numpy()


PHI_RESOLUTION = 1e-3  # φ differences below this are rounding (float32 bases), not structure


def phi_null_band(frames: torch.Tensor, k1: int, k2: int, level: float = 0.99) -> np.ndarray:
    """Simultaneous band of φ(i, j) between a fixed k1-subspace and a random k2-subspace of Rᵈ
    (by rotation invariance, also between two independent random subspaces): (2, k1, k2), low
    and high edges such that a random grid crosses the high edge anywhere with probability
    ≈ 1 − `level`, and likewise the low edge.

    Max-t over cells: with per-cell mean μ and sd σ of the draws, high = μ + c σ where c is the
    `level` quantile over draws of max_cells (φ − μ)/σ (low: the min). Pointwise quantiles
    would flag some cells of almost every random grid: φ's cells are strongly correlated.
    frames: (count, d, ≥ k2) Haar frames, d ≥ k1. Both edges are widened by `PHI_RESOLUTION`,
    so cells with (almost) no spread (φ(d, j) = 1) flag no rounding differences.
    """
    count, d, k = frames.shape
    if k1 > d or k2 > k:
        raise LoraAnalysisError(f"frames (count={count}, d={d}, k={k}) cannot give a ({k1}, {k2}) φ grid")
    grids = phi_grid(frames[:, :k1, :k2].double().numpy())
    mean, sd = grids.mean(axis=0), grids.std(axis=0)
    varying = sd > PHI_RESOLUTION / 100
    z = np.where(varying, (grids - mean) / np.where(varying, sd, 1.0), 0.0)
    high = float(np.quantile(z.max(axis=(1, 2)), level))
    low = float(np.quantile(z.min(axis=(1, 2)), 1.0 - level))
    return np.stack([mean + low * sd - PHI_RESOLUTION, mean + high * sd + PHI_RESOLUTION])
