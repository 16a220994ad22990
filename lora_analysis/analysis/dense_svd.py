"""The SVD of a formed ΔW (dense updates: full fine-tuning's W_ft − W₀, DoRA, loralib convs):
exact LAPACK for small matrices, a randomized SVD with a deterministic a-posteriori bound for
large ones. The one place that chooses between them (`SvdOptions`, `dense_svd`).

Randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4): Ω: (n, l) Gaussian (seeded), Q: (m, l)
an orthonormal basis of (AAᵀ)^q AΩ, re-orthonormalized after every product; B = QᵀA: (l, n),
E = A − QB = (I − QQᵀ)A. Since QᵀE = 0, for ANY orthonormal Q:

    AᵀA = BᵀB + EᵀE   ⇒   σᵢ(B)² ≤ σᵢ(A)² ≤ σᵢ(B)² + ‖E‖₂²     (Weyl; EᵀE ⪰ 0), i ≤ l
                           σ_{l+j}(A) ≤ σⱼ(E) ≤ ‖E‖_F              (rank QB ≤ l)
    ‖A‖²_F = ‖B‖²_F + ‖E‖²_F
    Σ_{i≤k} σᵢ(B)² ≤ Σ_{i≤k} σᵢ(A)² ≤ Σ_{i≤k} σᵢ(B)² + ‖E‖²_F  (Ky Fan)

and ‖E‖₂ ≤ ‖E‖_F = `residual`, computed from E itself in float64 (never as ‖A‖² − ‖B‖², which
cancels to noise when E is small), column block by column block so E is never whole in memory.
The sketch's quality (its width, the power iterations, float32 on the device) only decides how
tight the bound is, never whether it holds: Q is re-orthonormalized and B, E computed in float64.
Float64 rounding of these products (inner dimension ≤ max(m, n)) is covered by widening every
interval by `rounding` = (m + n)·eps·‖A‖_F (products of inner dimension ≤ max(m, n), and the
SVD of B, each accurate to a few eps·‖A‖ per dimension).

The sketch grows (l doubles from `SvdOptions.sketch`) until residual ≤ rtol·‖A‖_F. Where it
cannot get there (it would pass `max_sketch_fraction`·min(m, n) columns, beyond which it is no
longer cheaper, or the spectrum's flat tail, a noise floor, would need more: `_worth_growing`),
"auto" falls back to the exact SVD and "randomized" stops and states the bound it reached
(it never grows past that width either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import LoraAnalysisError
from ..seeding import seeded_generator

SvdMethod = Literal["auto", "exact", "randomized"]
SVD_METHODS: tuple[str, ...] = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class SvdOptions:
    """How a formed ΔW: (m, n) is decomposed.

    method: "exact" (LAPACK, float64), "randomized" (the bound of the module doc, whatever it
        reaches within max_sketch_fraction·min(m, n) columns), or "auto":
        exact when min(m, n) < `min_dim`, else randomized unless its sketch must grow past
        `max_sketch_fraction`·min(m, n) to reach `rtol` (then exact).
    rtol: stop growing the sketch once ‖E‖_F ≤ rtol·‖ΔW‖_F (so every σᵢ² is known within
        rtol²·‖ΔW‖²_F and every energy share within rtol²).
    sketch: first sketch width l (doubled while the bound misses rtol); `min_rank`: the sketch
        keeps at least min_rank + 10 columns (resize --rank R asks for R).
    power_iterations: q, re-orthonormalized; seed: of the Gaussian test matrix.
    """

    method: SvdMethod = "auto"
    rtol: float = 1e-2
    min_dim: int = 2048
    max_sketch_fraction: float = 0.25
    sketch: int = 128
    min_rank: int = 0
    power_iterations: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SVD_METHODS:
            raise LoraAnalysisError(f"unknown SVD method {self.method!r}: use one of {', '.join(SVD_METHODS)}")
        if not 0.0 < self.rtol < 1.0 or not 0.0 < self.max_sketch_fraction <= 1.0:
            raise LoraAnalysisError(f"SVD tolerance must be in (0, 1), got {self.rtol}")
        if self.sketch < 1 or self.power_iterations < 0 or self.min_rank < 0:
            raise LoraAnalysisError("SVD sketch must be >= 1, power iterations and min_rank >= 0")


def svd_options(svd: "SvdOptions | SvdMethod | None") -> SvdOptions:
    """`SvdOptions` from an options object, a method name, or None (the defaults)."""
    if svd is None:
        return SvdOptions()
    return svd if isinstance(svd, SvdOptions) else SvdOptions(method=svd)


@dataclass
class DenseSVD:
    """A formed M: (m, n) ≈ U diag(S) Vᵀ, U: (m, k), S: (k,) float64 descending, V: (n, k).

    exact: a full LAPACK SVD (k = min(m, n), residual 0). Otherwise S = σ(B) of the sketch
    (k = l ≤ min(m, n)), U = Q U_B, V = V_B, residual = ‖(I − QQᵀ)M‖_F, rounding = (m + n)·eps·‖M‖_F,
    frobenius = ‖M‖_F (direct): each true σᵢ ∈ [S[i] − rounding, √(S[i]² + residual²) + rounding],
    σ_{k+1}, … ≤ residual + rounding (module doc)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    exact: bool = True
    residual: float = 0.0
    rounding: float = 0.0
    frobenius: float | None = None

    @property
    def sketch(self) -> int | None:
        """l, the width of the range basis (None when exact)."""
        return None if self.exact else self.S.numel()


def dense_svd(M: torch.Tensor, svd: SvdOptions | SvdMethod | None = None,
              device: torch.device | str = "cpu") -> DenseSVD:
    """The SVD of a formed ΔW, M: (m, n) float64 with entries of order 1 (normalized by a power of
    two), by `svd` (see `SvdOptions`); the randomized products run on `device` (float32 sketch,
    float64 bound). The result lives on the CPU."""
    options = svd_options(svd)
    small = min(M.shape)
    if options.method == "exact" or (options.method == "auto" and small < options.min_dim):
        return exact_svd(M)
    width = min(max(options.sketch, options.min_rank + 10), small)
    limit = max(width, int(options.max_sketch_fraction * small))
    A = M.to(device=torch.device(device), dtype=torch.float64)
    A32 = _sketch_copy(A)
    norm = frobenius(A)
    rounding = (M.shape[0] + M.shape[1]) * torch.finfo(torch.float64).eps * norm
    while True:
        result = _sketched_svd(A, A32, width, options, norm, rounding)
        target = max(options.rtol * norm, rounding)
        if result.residual <= target:
            return result
        if width >= limit or not _worth_growing(result, limit, target):
            return exact_svd(M) if options.method == "auto" else result
        width = min(2 * width, limit)


def _worth_growing(result: DenseSVD, limit: int, target: float) -> bool:
    """Whether a sketch of `limit` columns could plausibly reach `target` (a forecast for the
    work, never for the bound): the σ beyond the sketch are at most about σ_l, so widening from l
    to `limit` removes at most (limit − l)·σ_l² of the residual². A flat tail (a noise floor)
    fails this at once: only the exact SVD resolves it."""
    width, last = result.S.numel(), float(result.S[-1])
    return result.residual**2 - (limit - width) * last**2 <= target**2


def _sketch_copy(A: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """A·2**-e in float32, largest entry in [0.5, 1) (no float32 over- or underflow whatever A's
    magnitude), a block of rows at a time: the matrix the sketch multiplies (twice the float64
    speed on CPUs, tensor cores on GPUs). Q is the same for any positive multiple of A."""
    low, high = torch.aminmax(A)
    peak = max(-float(low), float(high))
    scale = 2.0 ** -math.frexp(peak)[1] if peak else 1.0
    A32 = torch.empty(A.shape, dtype=torch.float32, device=A.device)
    for i in range(0, A.shape[0], block):
        A32[i:i + block] = A[i:i + block] * scale
    return A32


def exact_svd(M: torch.Tensor) -> DenseSVD:
    """LAPACK's thin SVD of M: (m, n) float64, on the CPU."""
    U, S, Vh = torch.linalg.svd(M.cpu(), full_matrices=False)
    return DenseSVD(U, S, Vh.T)


def _sketched_svd(A: torch.Tensor, A32: torch.Tensor, width: int, options: SvdOptions, norm: float,
                  rounding: float) -> DenseSVD:
    """One randomized SVD of A: (m, n) float64 with a sketch of `width` columns (module doc)."""
    generator = seeded_generator(options.seed, "dense_svd")
    omega = torch.randn(A.shape[1], width, generator=generator, dtype=torch.float32).to(A32.device)
    Q = torch.linalg.qr(A32 @ omega).Q
    for _ in range(options.power_iterations):
        Q = torch.linalg.qr(A32 @ torch.linalg.qr(A32.T @ Q).Q).Q
    # One last pass in float64: Q orthonormal to float64 precision (the bound needs QᵀQ = I), and
    # the range of a (numerically) low-rank ΔW captured to float64 rather than float32 precision.
    Q = torch.linalg.qr(A @ torch.linalg.qr(A.T @ Q.double()).Q).Q
    B = Q.T @ A  # (l, n) float64
    residual = _residual_norm(A, Q, B)
    U_B, S, Vh = torch.linalg.svd(B.cpu(), full_matrices=False)
    U = (Q.cpu() @ U_B)
    return DenseSVD(U, S, Vh.T, exact=False, residual=residual, rounding=rounding, frobenius=norm)


def _residual_norm(A: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, block: int = 1024) -> float:
    """‖A − QB‖_F in float64, a block of columns at a time (never the whole m × n residual)."""
    parts = [frobenius(A[:, j:j + block] - Q @ B[:, j:j + block]) for j in range(0, A.shape[1], block)]
    return combined_norm(parts)


def frobenius(X: torch.Tensor, block: int = 1024) -> float:
    """‖X‖_F in float64 without under- or overflow of the squares, peak·‖X/peak‖_F, a block of
    rows at a time (no temporary as large as X)."""
    if not X.numel():
        return 0.0
    low, high = torch.aminmax(X)  # one pass, no |X| copy
    peak = max(-float(low), float(high))
    if peak == 0.0:
        return 0.0
    squares = sum(float(torch.linalg.vector_norm(X[i:i + block] / peak, dtype=torch.float64)) ** 2
                  for i in range(0, X.shape[0], block))
    return peak * math.sqrt(squares)


def combined_norm(norms: list[float]) -> float:
    """√Σ xᵢ² of non-negative floats, scaled by the largest (no under- or overflow)."""
    peak = max(norms, default=0.0)
    return peak * math.sqrt(sum((x / peak) ** 2 for x in norms)) if peak else 0.0
