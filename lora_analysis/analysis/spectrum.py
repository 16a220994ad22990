"""Exact thin SVD of ΔW = s·B·A from the factors, and rank metrics of its spectrum.

Never forms the d_out × d_in matrix (Hu et al. 2021, Sec. 7; ../DESIGN.md "Math")::

    B = Q_B R_B,  Aᵀ = Q_A R_A            (reduced QR, compute dtype ≥ float32)
    s · R_B R_Aᵀ = U_c diag(S) V_cᵀ        (small core, float64)
    ΔW = U diag(S) Vᵀ,  U = Q_B U_c: (d_out, m),  V = Q_A V_c: (d_in, m),  m = min(r, d_out, d_in)

Cost O((d_out + d_in)·r²) per module. Orientation: always the `nn.Linear` one, ΔW: (d_out, d_in);
U spans the output space and V the input space, also for GPT-2's Conv1D (`fan_in_fan_out`),
whose stored ΔW is the transpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import Adapter, LoraModule
from ..config import BASIS_KINDS, BasisKind
from ..devices import resolve_device
from ..errors import LoraAnalysisError, shown

DEFAULT_TAUS: tuple[float, ...] = (0.9, 0.99)
T = TypeVar("T")


@dataclass
class Basis:
    """Orthonormal singular vectors ordered by singular value, for φ.

    Kept factored as vectors = frame @ rotation, frame: (d, k) orthonormal (a Q factor),
    rotation: (k, k') float64 orthogonal columns, so φ between two bases needs one d-sized
    product (frame₁ᵀframe₂) and small ones. singular_values: (k',) float64, descending; rank:
    numerical rank — columns beyond it belong to (numerically) zero singular values and are arbitrary.
    """

    frame: torch.Tensor
    rotation: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    kind: BasisKind

    @property
    def dim(self) -> int:
        return self.frame.shape[0]

    @cached_property
    def vectors(self) -> torch.Tensor:
        """(d, k') singular vectors, in the frame's dtype."""
        return self.frame @ self.rotation.to(self.frame)


@dataclass
class ModuleSpectrum:
    """Exact thin SVD of one module's ΔW = s·B·A = U diag(S) Vᵀ, ΔW: (d_out, d_in).

    S: (m,) float64, descending, includes the scale s. `numerical_rank` counts S > `tolerance`
    = max(d_out, d_in)·eps·σ₁ (eps of the compute dtype); directions beyond it are arbitrary.
    U: (d_out, m) output space, V: (d_in, m) input space — formed on first access from the
    factorization kept here (B = Q_B R_B, Aᵀ = Q_A R_A, s·R_B R_Aᵀ = core_U diag(S) core_Vᵀ).
    """

    S: torch.Tensor
    numerical_rank: int
    tolerance: float
    r: int
    d_out: int
    d_in: int
    scale: float
    alpha_known: bool
    fan_in_fan_out: bool
    Q_B: torch.Tensor = field(repr=False)  # (d_out, k_b), k_b = min(d_out, r)
    R_B: torch.Tensor = field(repr=False)  # (k_b, r) float64
    Q_A: torch.Tensor = field(repr=False)  # (d_in, k_a), k_a = min(d_in, r)
    R_A: torch.Tensor = field(repr=False)  # (k_a, r) float64
    core_U: torch.Tensor = field(repr=False)  # (k_b, m) float64
    core_V: torch.Tensor = field(repr=False)  # (k_a, m) float64
    _bases: dict[BasisKind, Basis] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in): ΔW in the Linear orientation."""
        return (self.d_out, self.d_in)

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors of ΔW, (d_out, m), output space (formed once, on first access)."""
        return self.basis("dW-left").vectors

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors of ΔW, (d_in, m), input space (formed once, on first access)."""
        return self.basis("dW-right").vectors

    @property
    def eps(self) -> float:
        return torch.finfo(self.Q_B.dtype).eps

    @property
    def frobenius_norm(self) -> float:
        """‖ΔW‖_F = √Σσ² over the singular values above the tolerance (`frobenius_norm`)."""
        return frobenius_norm(self.S, self.tolerance)

    def basis(self, kind: BasisKind = "A") -> Basis:
        """Singular vectors for φ (paper Eq. 4), computed once per kind.

        "A": right-singular vectors of A, (d_in, k_a) — the paper's choice (Sec. 7.2).
        "B": left-singular vectors of B, (d_out, k_b) — the paper's footnote alternative.
        "dW-left" / "dW-right": U (d_out, m) / V (d_in, m) of ΔW.
        """
        if kind not in self._bases:
            self._bases[kind] = self._basis(kind)
        return self._bases[kind]

    def _basis(self, kind: BasisKind) -> Basis:
        if kind == "dW-left":
            return Basis(self.Q_B, self.core_U, self.S, self.numerical_rank, kind)
        if kind == "dW-right":
            return Basis(self.Q_A, self.core_V, self.S, self.numerical_rank, kind)
        if kind == "A":  # A = R_Aᵀ Q_Aᵀ; R_Aᵀ = P Σ Tᵀ  ⇒  right vectors of A: Q_A T
            _, sv, th = torch.linalg.svd(self.R_A.T, full_matrices=False)
            tolerance = rank_tolerance(sv, max(self.r, self.d_in), self.eps)
            return Basis(self.Q_A, th.T, sv, numerical_rank(sv, tolerance), kind)
        if kind == "B":  # B = Q_B R_B; R_B = P Σ Tᵀ  ⇒  left vectors of B: Q_B P
            p, sv, _ = torch.linalg.svd(self.R_B, full_matrices=False)
            tolerance = rank_tolerance(sv, max(self.r, self.d_out), self.eps)
            return Basis(self.Q_B, p, sv, numerical_rank(sv, tolerance), kind)
        raise LoraAnalysisError(f"unknown basis {kind!r}: use one of {', '.join(BASIS_KINDS)}")

    def metrics(self, taus: Sequence[float] = DEFAULT_TAUS) -> "RankMetrics":
        """`rank_metrics` of S with this spectrum's tolerance."""
        return rank_metrics(self.S, taus, tolerance=self.tolerance)


@dataclass
class RankMetrics:
    """Named rank measures of one spectrum σ₁ ≥ … ≥ σ_m ≥ 0 (values ≤ tolerance count as 0).

    frobenius ‖ΔW‖_F = √Σσ²; sigma_max σ₁; stable_rank Σσ²/σ₁²; roy_vetterli_rank exp(H(p)),
    p = σ/Σσ (Roy & Vetterli 2007); energy_effective_rank exp(H(p)), p = σ²/Σσ²;
    energy_rank[τ] = smallest k with Σ_{i≤k}σ² ≥ τ·Σσ²; numerical_rank = #σ > tolerance.
    All ranks are 0 for ΔW = 0.
    """

    frobenius: float
    sigma_max: float
    stable_rank: float
    roy_vetterli_rank: float
    energy_effective_rank: float
    energy_rank: dict[float, int]
    numerical_rank: int


def rank_tolerance(S: torch.Tensor, dim: int, eps: float) -> float:
    """dim·eps·σ₁ for descending S (the numpy `matrix_rank` rule): singular values at or below
    it are numerically zero."""
    return float(dim * eps * S[0]) if S.numel() else 0.0


def numerical_rank(S: torch.Tensor | np.ndarray, tolerance: float) -> int:
    """#σ > `tolerance` (see `rank_tolerance`)."""
    return int((S > tolerance).sum())


def frobenius_norm(S: torch.Tensor | np.ndarray, tolerance: float = 0.0) -> float:
    """‖ΔW‖_F = √Σσ² (float64) over the singular values above `tolerance`."""
    s = np.asarray(torch.as_tensor(S).detach().cpu(), dtype=np.float64)
    return math.sqrt(float(np.square(s[s > tolerance]).sum()))


def rank_metrics(S: torch.Tensor | np.ndarray, taus: Sequence[float] = DEFAULT_TAUS, tolerance: float = 0.0) -> RankMetrics:
    """Rank metrics of singular values S (any order; see `RankMetrics`)."""
    for tau in taus:
        if not 0.0 < tau <= 1.0:
            raise LoraAnalysisError(f"energy threshold tau must be in (0, 1], got {tau}")
    s = np.sort(np.asarray(torch.as_tensor(S).detach().cpu(), dtype=np.float64))[::-1]
    rank = numerical_rank(s, tolerance)
    s = np.where(s > tolerance, s, 0.0)
    energy = s**2
    total = energy.sum()
    if rank == 0:
        return RankMetrics(0.0, 0.0, 0.0, 0.0, 0.0, {float(t): 0 for t in taus}, 0)
    cumulative = np.cumsum(energy)
    # Relative slack so that e.g. τ = 0.5 of four equal values gives 2, not 3, under rounding.
    energy_rank = {float(t): int(np.searchsorted(cumulative, t * total * (1 - 1e-12)) + 1) for t in taus}
    return RankMetrics(
        frobenius=frobenius_norm(s, tolerance),
        sigma_max=float(s[0]),
        stable_rank=float(total / s[0] ** 2),
        roy_vetterli_rank=_exp_entropy(s / s.sum()),
        energy_effective_rank=_exp_entropy(energy / total),
        energy_rank=energy_rank,
        numerical_rank=rank,
    )


def _exp_entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def module_spectrum(
    module: LoraModule, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32
) -> ModuleSpectrum:
    """Exact thin SVD of one module's ΔW (see module docstring); dtype: float32 or float64 QR."""
    return next(iter_spectra([("module", module)], device, dtype))[1]


def iter_spectra(
    modules: Iterable[tuple[str, LoraModule]],
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    source: str | None = None,
) -> Iterator[tuple[str, ModuleSpectrum]]:
    """(name, spectrum) for a stream of modules, in order; `source` (the adapter's file) is named
    in errors.

    Consecutive modules of equal shape are stacked into batches of up to `batch_size` for one
    batched QR/SVD; memory stays at one batch, so a lazy reader can stream a large adapter.
    """
    device = resolve_device(device)
    batch: list[tuple[str, LoraModule]] = []
    for name, module in modules:
        if batch and (_shape_key(module) != _shape_key(batch[0][1]) or len(batch) >= batch_size):
            yield from _flush(batch, device, dtype, source)
            batch = []
        batch.append((name, module))
    yield from _flush(batch, device, dtype, source)


def adapter_spectra(
    adapter: Adapter | Mapping[str, LoraModule],
    progress: bool = True,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
) -> dict[str, ModuleSpectrum]:
    """Spectrum of every module, in adapter order (see `iter_spectra`)."""
    items = adapter.items()
    source = adapter.source if isinstance(adapter, Adapter) else None
    return dict(with_progress(iter_spectra(items, device, dtype, source=source), len(items), "spectra", progress))


def with_progress(results: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    """`results` with a progress bar on stderr counting modules DONE: the bar advances when the
    consumer asks for the next result, i.e. once it has finished with the previous one (a bar
    over the inputs would reach 100 % while the last batch is still being computed)."""
    with tqdm(total=total, desc=desc, unit="module", disable=not enabled) as bar:
        for result in results:
            yield result
            bar.update()


def _shape_key(m: LoraModule) -> tuple:
    return (tuple(m.A.shape), tuple(m.B.shape))


def _flush(batch: list[tuple[str, LoraModule]], device: torch.device, dtype: torch.dtype, source: str | None):
    if not batch:
        return
    try:
        spectra = _spectra_of_batch([m for _, m in batch], device, dtype)
    except torch.linalg.LinAlgError:
        spectra = None
    if spectra is None or not all(torch.isfinite(s.S).all() for s in spectra):
        # Only on failure: find the culprit and the cause rather than scanning every factor up front.
        name, cause = next(((n, c) for n, m in batch if (c := _failure_cause(m))),
                           (batch[0][0], "the SVD did not converge (LAPACK)"))
        where = f"{shown(source)}: " if source else ""
        raise LoraAnalysisError(f"{where}cannot compute the spectrum of module {shown(name)}: {cause}")
    yield from zip((name for name, _ in batch), spectra)


def _failure_cause(m: LoraModule) -> str | None:
    """Why this module's spectrum is not finite, if its numbers show it: non-finite factors or
    scale, or a ΔW = s·B·A whose size (bounded by |s|·‖B‖_F·‖A‖_F, taken in log space) may
    exceed float64's range."""
    if not (torch.isfinite(m.A).all() and torch.isfinite(m.B).all()):
        return "its LoRA factors contain NaN or Inf"
    if not math.isfinite(m.scale):
        return f"its scale s = α/r = {m.scale} is not finite"
    bound = math.log10(abs(m.scale) or 1.0) + _log10_norm(m.A) + _log10_norm(m.B)
    if bound > 300:
        return (f"ΔW = s·B·A reaches about 1e{bound:.0f} (|s|·‖B‖_F·‖A‖_F with s = {m.scale:.3g}), "
                "beyond float64's range (1.8e308)")
    return None


def _log10_norm(x: torch.Tensor) -> float:
    """log10 ‖x‖_F without overflow (the largest |entry| factored out); -inf for x = 0."""
    x = x.detach().to("cpu", torch.float64)
    peak = float(x.abs().max())
    return math.log10(peak) + math.log10(float(torch.linalg.norm(x / peak))) if peak > 0 else -math.inf


def _compute_dtype(module: LoraModule, dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        raise LoraAnalysisError(f"spectrum compute dtype must be float32 or float64, got {dtype}")
    return torch.float64 if torch.float64 in (module.A.dtype, module.B.dtype) else dtype


def _spectra_of_batch(modules: list[LoraModule], device: torch.device, dtype: torch.dtype) -> list[ModuleSpectrum]:
    """Spectra of modules with equal factor shapes: one batched QR per factor, one batched core SVD."""
    first = modules[0]
    dtype = _compute_dtype(first, dtype)
    # Filled with one converting copy per factor and laid out column-major (the .mT views), so
    # LAPACK/cuSOLVER take them without another copy.
    Bt = torch.empty(len(modules), first.r, first.d_out, device=device, dtype=dtype)
    A = torch.empty(len(modules), first.r, first.d_in, device=device, dtype=dtype)
    for i, m in enumerate(modules):
        Bt[i].copy_(m.B.T)
        A[i].copy_(m.A)
    Q_B, R_B = torch.linalg.qr(Bt.mT)  # B: (n, d_out, r)
    Q_A, R_A = torch.linalg.qr(A.mT)  # Aᵀ: (n, d_in, r)
    del Bt, A
    # The r × r core in float64 on the CPU: tiny, and exact to double precision.
    R_B, R_A = R_B.to("cpu", torch.float64), R_A.to("cpu", torch.float64)
    scales = torch.tensor([m.scale for m in modules], dtype=torch.float64)
    core = scales[:, None, None] * (R_B @ R_A.mT)
    core_U, S, core_Vh = torch.linalg.svd(core, full_matrices=False)
    eps = torch.finfo(dtype).eps
    dim = max(first.d_out, first.d_in)
    spectra = []
    for i, m in enumerate(modules):
        tolerance = rank_tolerance(S[i], dim, eps)
        spectra.append(
            ModuleSpectrum(
                S=S[i],
                numerical_rank=numerical_rank(S[i], tolerance),
                tolerance=tolerance,
                r=m.r,
                d_out=m.d_out,
                d_in=m.d_in,
                scale=m.scale,
                alpha_known=m.alpha_known,
                fan_in_fan_out=m.fan_in_fan_out,
                Q_B=Q_B[i],
                R_B=R_B[i],
                Q_A=Q_A[i],
                R_A=R_A[i],
                core_U=core_U[i],
                core_V=core_Vh[i].mT,
            )
        )
    return spectra
