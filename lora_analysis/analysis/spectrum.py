"""Exact thin SVD of every module's ΔW from its factored form, and rank metrics of its spectrum.

Each update hands over an exact form of ΔW (`adapters.updates`); nothing d_out × d_in is ever
formed except where the form is dense (DoRA, loralib's reshaped conv: the documented exception).

Low rank, ΔW = s · B diag(e) A (LoRA, AdaLoRA, Tucker's (up, M), LoHa's Khatri–Rao factors),
B: (d_out, k), A: (k, d_in) — the route every low-rank kind takes (Hu et al. 2021, Sec. 7)::

    B = Q_B R_B,  Aᵀ = Q_A R_A            (reduced QR, compute dtype ≥ float32, batched)
    R_B diag(e) R_Aᵀ = U_c diag(S') V_cᵀ    (small core, float64)
    ΔW = U diag(S) Vᵀ,  U = Q_B U_c: (d_out, m),  V = Q_A V_c: (d_in, m),  S = s·S'

Kronecker, ΔW = s · (L ⊗ R) (LoKr): the SVDs of L and R (float64), σ = {σᵢ(L)σⱼ(R)} sorted,
singular vectors uᵢ ⊗ u'ⱼ, formed only when a basis is asked for.
Block diagonal (fused experts): the union of the blocks' spectra, vectors placed per block.
Dense, ΔW = s · M: `dense_svd` — LAPACK in float64, or for large matrices a randomized SVD
whose a-posteriori bound brackets every singular value (`dense_svd.py`; `ModuleSpectrum.exact`,
`.residual`, `.bounds`; `rank_metrics_bounded` for what that bound determines).

Over the whole float range: every tensor is first scaled by an exact power of two so its
largest entry lies in [0.5, 1) (`updates.normalized`), the powers of two join s in a `Scale`
(float64 mantissa, integer exponent), the SVD runs on the normalized factors, and only the
singular values are multiplied back, once. Metrics are computed on σ/σ₁ and scaled back
(`rank_metrics`). Where a number cannot be represented in float64 (σ₁ overflows; a singular
value above the numerical-rank tolerance is below the normal range) the module is refused
with one line rather than reported wrong.

Orientation: always the `nn.Linear` one, ΔW: (d_out, d_in); U spans the output space and V the
input space, also for GPT-2's Conv1D and embeddings, whose stored ΔW is the transpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import Adapter, Update
from ..adapters.updates import (
    BlockDiagonalForm,
    DenseForm,
    Form,
    KroneckerForm,
    LowRankForm,
    Scale,
    UpdateInfo,
    normalized,
    peak_exponent,
    times_power_of_two_,
)
from ..config import BASIS_KINDS, BasisKind
from ..devices import resolve_device
from ..errors import InputFileError, LoraAnalysisError, shown
from .dense_svd import DenseSVD, SvdMethod, SvdOptions, dense_svd, svd_options

DEFAULT_TAUS: tuple[float, ...] = (0.9, 0.99)
FLOAT64_TINY = float(np.finfo(np.float64).tiny)  # smallest normal float64
# Thresholds on σ (energy τ, ratio σ₁/x) are met within this relative slack, so that e.g. τ = 0.5
# of four equal values gives 2, not 3, and σ = σ₁/4 passes σ ≥ σ₁/4, under rounding of the SVD.
THRESHOLD_SLACK = 1e-12
T = TypeVar("T")

# Where the base weight W₀ of a module comes from, for kinds whose ΔW needs it (DoRA).
BaseWeightSource = Callable[[str, Update], torch.Tensor]


@dataclass
class Basis:
    """Orthonormal singular vectors ordered by singular value, for φ.

    Kept factored as vectors = frame @ rotation, frame: (d, k) orthonormal (a Q factor),
    rotation: (k, k') float64 orthogonal columns, or None for the identity (frames that
    already are the vectors), so φ between two bases needs one d-sized product
    (frame₁ᵀframe₂) and small ones. singular_values: (k',) float64, descending (of ΔW up to
    scale, or of a factor for the bases "A"/"B"); rank: numerical rank — columns beyond it
    belong to (numerically) zero singular values and are arbitrary.
    """

    frame: torch.Tensor
    rotation: torch.Tensor | None
    singular_values: torch.Tensor
    rank: int
    kind: BasisKind

    @property
    def dim(self) -> int:
        return self.frame.shape[0]

    @property
    def width(self) -> int:
        """k': number of vectors."""
        return self.frame.shape[1] if self.rotation is None else self.rotation.shape[1]

    @cached_property
    def vectors(self) -> torch.Tensor:
        """(d, k') singular vectors, in the frame's dtype."""
        return self.frame if self.rotation is None else self.frame @ self.rotation.to(self.frame)


@dataclass
class ModuleSpectrum:
    """Exact thin SVD of one module's ΔW = U diag(S) Vᵀ, ΔW: (d_out, d_in), of any update kind.

    S: (m,) float64, descending, includes the scale s. `numerical_rank` counts S > `tolerance`
    = max(d_out, d_in)·eps·σ₁ (eps of the compute dtype); directions beyond it are arbitrary.
    U: (d_out, m) output space, V: (d_in, m) input space — formed on first access (`basis`).
    `info`: the update's kind, r, α, scale, storage (`UpdateInfo`). `exact`: the SVD is exact
    to the compute precision. Otherwise (a randomized SVD of a dense ΔW, `dense_svd`) S holds the
    l = `sketch` singular values of the sketch, each a lower bound: the true σᵢ lies in
    `bounds()` = [S − rounding, √(S² + residual²) + rounding], and σ_{l+1}, … ≤ residual + rounding,
    residual = ‖(I − QQᵀ)ΔW‖_F; U, V are the sketch's (approximate) singular vectors.
    """

    S: torch.Tensor
    numerical_rank: int
    tolerance: float
    info: UpdateInfo
    dtype: torch.dtype
    device: torch.device
    _factories: dict[BasisKind, Callable[[], Basis]] = field(repr=False)
    exact: bool = True
    residual: float = 0.0
    rounding: float = 0.0
    total_norm: float | None = None
    released: bool = field(default=False, init=False)
    _bases: dict[BasisKind, Basis] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in): ΔW in the Linear orientation (convs flattened per output channel)."""
        return self.info.shape

    @property
    def d_out(self) -> int:
        return self.info.shape[0]

    @property
    def d_in(self) -> int:
        return self.info.shape[1]

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def r(self) -> int | None:
        return self.info.r

    @property
    def scale(self) -> float:
        """s (1.0 where α is unknown: see `alpha_known`)."""
        return 1.0 if self.info.scale is None else self.info.scale

    @property
    def alpha_known(self) -> bool:
        return self.info.alpha_known

    @property
    def fan_in_fan_out(self) -> bool:
        return self.info.storage.transposed is True

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors of ΔW, (d_out, m), output space (formed once, on first access)."""
        return self.basis("dW-left").vectors

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors of ΔW, (d_in, m), input space (formed once, on first access)."""
        return self.basis("dW-right").vectors

    @property
    def Q_B(self) -> torch.Tensor:
        """The orthonormal frame of the left singular vectors (Q_B of the low-rank route); its
        dtype and device are the spectrum's."""
        return self.basis("dW-left").frame

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps

    @property
    def frobenius_norm(self) -> float:
        """‖ΔW‖_F = √Σσ² over the singular values above the tolerance (`frobenius_norm`); from a
        randomized SVD, computed from ΔW itself."""
        return self.total_norm if self.total_norm is not None else frobenius_norm(self.S, self.tolerance)

    @property
    def has_factor_bases(self) -> bool:
        """Whether the bases "A" and "B" exist: the update has trained factors B and A
        (LoRA, AdaLoRA, Tucker's up and M), not LoHa, LoKr, DoRA, dense or fused experts."""
        return "A" in self._factories

    def basis(self, kind: BasisKind = "A") -> Basis:
        """Singular vectors for φ (paper Eq. 4), computed once per kind.

        "A": right-singular vectors of A, (d_in, k_a) — the paper's choice (Sec. 7.2).
        "B": left-singular vectors of B, (d_out, k_b) — the paper's footnote alternative.
        "dW-left" / "dW-right": U (d_out, m) / V (d_in, m) of ΔW — for every kind.
        "A" and "B" exist only where the update has such factors (`has_factor_bases`).
        """
        if kind not in BASIS_KINDS:
            raise LoraAnalysisError(f"unknown basis {kind!r}: use one of {', '.join(BASIS_KINDS)}")
        if not self.resolved:
            raise LoraAnalysisError(
                f"this {self.kind} module's ΔW ({self.d_out}×{self.d_in}) was decomposed by a randomized SVD whose bound "
                f"(residual {self.residual:.3g}) covers its singular values, not its singular vectors: decompose it "
                "exactly (svd='exact', --svd exact) for φ and the comparisons with W")
        return self.computed_basis(kind)

    def computed_basis(self, kind: BasisKind) -> Basis:
        """The vectors the SVD computed, whatever its route: `basis` for an exact spectrum; for a
        randomized one the sketch's U = Q·U_B, V = V_B, whose truncation Q·B_k is what `resize`
        writes (its error is then known exactly)."""
        if kind not in self._bases:
            if self.released:
                raise LoraAnalysisError(f"the singular vectors of this {self.kind} module were released "
                                        "(release_vectors / AnalysisOptions(keep_vectors=False))")
            if kind not in self._factories:
                raise LoraAnalysisError(
                    f"basis {kind!r} needs the LoRA factor {kind}, and a {self.kind} update has none: "
                    f"use dW-{'right' if kind == 'A' else 'left'} (ΔW's own singular vectors in the same space)")
            self._bases[kind] = self._factories[kind]()
        return self._bases[kind]

    @property
    def method(self) -> str:
        """Which SVD computed S: "exact" or "randomized"."""
        return "exact" if self.exact else "randomized"

    @property
    def sketch(self) -> int | None:
        """l, the randomized SVD's sketch width (None when exact)."""
        return None if self.exact else self.S.numel()

    @property
    def resolved(self) -> bool:
        """Whether S is the whole spectrum to the rounding of an exact SVD: exact, or a sketch
        whose residual is below the numerical-rank tolerance (every σ beyond the sketch is
        numerically zero, every σᵢ known to the rounding of the exact route)."""
        return self.exact or self.residual <= self.tolerance

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) float64 bounds of σ₁..σ_len(S) (both S when exact; see the class doc)."""
        if self.exact:
            return self.S, self.S
        lower = (self.S - self.rounding).clamp_min(0.0)
        return lower, torch.hypot(self.S, torch.tensor(self.residual, dtype=self.S.dtype)) + self.rounding  # no under/overflow

    def metrics(self, taus: Sequence[float] = DEFAULT_TAUS) -> "RankMetrics":
        """`rank_metrics` of S with this spectrum's tolerance; for a randomized spectrum that is
        not `resolved`, `rank_metrics_bounded` (intervals, and None where undetermined)."""
        if self.resolved:
            return rank_metrics(self.S, taus, tolerance=self.tolerance)
        return rank_metrics_bounded(self, taus)

    def release_vectors(self) -> None:
        """Drop the singular vectors (and what they are made from: d × r frames per module),
        keeping S and everything computed from it; `basis` refuses afterwards. For reports of
        large adapters, which need the vectors only while each module is analysed."""
        self._factories, self._bases = {}, {}
        self.released = True


@dataclass
class MetricIntervals:
    """Deterministic bounds of the rank metrics of a randomized spectrum (`rank_metrics_bounded`):
    each true value lies in its closed interval [low, high]."""

    sigma_max: tuple[float, float]
    stable_rank: tuple[float, float | None]
    energy_rank: dict[float, tuple[int, int]]
    numerical_rank: tuple[int, int]


@dataclass
class RankMetrics:
    """Named rank measures of one spectrum σ₁ ≥ … ≥ σ_m ≥ 0 (values ≤ tolerance count as 0).

    frobenius ‖ΔW‖_F = √Σσ²; sigma_max σ₁; stable_rank Σσ²/σ₁²; roy_vetterli_rank exp(H(p)),
    p = σ/Σσ (Roy & Vetterli 2007); energy_effective_rank exp(H(p)), p = σ²/Σσ²;
    energy_rank[τ] = smallest k with Σ_{i≤k}σ² ≥ τ·Σσ²; numerical_rank = #σ > tolerance.
    All ranks are 0 for ΔW = 0. Computed on σ/σ₁, so any σ₁ in float64's range gives the same
    ranks and a representable ‖ΔW‖_F = σ₁·√Σ(σ/σ₁)².
    From a randomized SVD that does not resolve the spectrum: `intervals` bounds them, and a
    value is None unless its interval is one integer (exact or refuse: never a point estimate).
    """

    frobenius: float
    sigma_max: float | None
    stable_rank: float | None
    roy_vetterli_rank: float | None
    energy_effective_rank: float | None
    energy_rank: dict[float, int | None]
    numerical_rank: int | None
    intervals: MetricIntervals | None = None

    def resolved(self, name: str, tau: float | None = None) -> float:
        """Metric `name` (a field; `energy_rank` at `tau`) where the spectrum resolves it (always
        for `rank_metrics` of a whole spectrum); LoraAnalysisError where the bound leaves it open."""
        value = self.energy_rank.get(tau) if name == "energy_rank" and tau is not None else getattr(self, name)
        if value is None or isinstance(value, dict):
            raise LoraAnalysisError(f"{name}{'' if tau is None else f' at {tau}'} is not resolved by this spectrum's bound")
        return value


def rank_tolerance(S: torch.Tensor, dim: int, eps: float) -> float:
    """dim·eps·σ₁ for descending S (the numpy `matrix_rank` rule): singular values at or below
    it are numerically zero."""
    return float(dim * eps * S[0]) if S.numel() else 0.0


def numerical_rank(S: torch.Tensor | np.ndarray, tolerance: float) -> int:
    """#σ > `tolerance` (see `rank_tolerance`)."""
    return int((S > tolerance).sum())


def frobenius_norm(S: torch.Tensor | np.ndarray, tolerance: float = 0.0) -> float:
    """‖ΔW‖_F = √Σσ² (float64) over the singular values above `tolerance`, as σ₁·√Σ(σ/σ₁)²
    (no underflow of σ² for tiny σ, no overflow for huge ones)."""
    s = np.asarray(torch.as_tensor(S).detach().cpu(), dtype=np.float64)
    s = s[s > tolerance]
    if not s.size:
        return 0.0
    peak = float(s.max())
    return _times(peak, math.sqrt(float(np.square(s / peak).sum())), "‖ΔW‖_F")


def _times(peak: float, factor: float, what: str) -> float:
    value = peak * factor
    if not math.isfinite(value):
        raise LoraAnalysisError(f"{what} = {peak:.3g} × {factor:.6g} overflows float64: not representable")
    return value


def rank_metrics(S: torch.Tensor | np.ndarray, taus: Sequence[float] = DEFAULT_TAUS, tolerance: float = 0.0) -> RankMetrics:
    """Rank metrics of singular values S (any order; see `RankMetrics`), computed on σ/σ₁."""
    for tau in taus:
        if not 0.0 < tau <= 1.0:
            raise LoraAnalysisError(f"energy threshold tau must be in (0, 1], got {tau}")
    s = np.sort(np.asarray(torch.as_tensor(S).detach().cpu(), dtype=np.float64))[::-1]
    rank = numerical_rank(s, tolerance)
    if rank == 0:
        return RankMetrics(0.0, 0.0, 0.0, 0.0, 0.0, {float(t): 0 for t in taus}, 0)
    peak = float(s[0])
    ratio = np.where(s > tolerance, s / peak, 0.0)  # σ/σ₁ ∈ [0, 1]
    energy = ratio**2
    total = energy.sum()
    cumulative = np.cumsum(energy)
    energy_rank: dict[float, int | None] = {
        float(t): int(np.searchsorted(cumulative, t * total * (1 - THRESHOLD_SLACK)) + 1) for t in taus}
    return RankMetrics(
        frobenius=_times(peak, math.sqrt(float(total)), "‖ΔW‖_F"),
        sigma_max=peak,
        stable_rank=float(total),
        roy_vetterli_rank=_exp_entropy(ratio / ratio.sum()),
        energy_effective_rank=_exp_entropy(energy / total),
        energy_rank=energy_rank,
        numerical_rank=rank,
    )


def _exp_entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def rank_metrics_bounded(spectrum: ModuleSpectrum, taus: Sequence[float] = DEFAULT_TAUS) -> RankMetrics:
    """What the bound of a randomized spectrum determines (`ModuleSpectrum.bounds`, r = residual,
    ε = rounding, ‖ΔW‖_F computed directly and exact):

        σ₁ ∈ [lo₁, hi₁];  stable rank ‖ΔW‖²_F/σ₁² ∈ [‖ΔW‖²_F/hi₁², ‖ΔW‖²_F/lo₁²]
        Σ_{i≤k}σᵢ² ∈ [Σ_{i≤k}loᵢ², min(Σ_{i≤k}hiᵢ², Σ_{i≤k}(σᵢ(B) + ε)² + r²)]  (Ky Fan)
        ⇒ energy rank at τ ∈ [first k whose upper sum reaches τ‖ΔW‖²_F, first k whose lower sum
          does (min(d_out, d_in) when none within the sketch)]
        numerical rank ∈ [#loᵢ > tol_hi, #hiᵢ > tol_lo (+ the rest when r + ε > tol_lo)], tol = dim·eps·σ₁

    Integers are given where their interval is one value; σ₁ and the stable rank only as
    intervals; the entropy ranks need the whole spectrum, which the sketch does not resolve: None.
    """
    lower, upper = (b.detach().cpu().double().numpy() for b in spectrum.bounds())
    norm = spectrum.total_norm if spectrum.total_norm is not None else frobenius_norm(spectrum.S)
    full = min(spectrum.shape)
    if norm == 0.0:
        return rank_metrics(spectrum.S, taus, spectrum.tolerance)
    lo, hi = lower / norm, upper / norm  # on ‖ΔW‖_F's scale: no over- or underflow of the squares
    sketch = spectrum.S.detach().cpu().double().numpy() / norm
    tail = (spectrum.residual / norm) ** 2
    cum_low = np.cumsum(lo**2)
    cum_high = np.minimum(np.minimum(np.cumsum(hi**2), np.cumsum((sketch + spectrum.rounding / norm) ** 2) + tail), 1.0)
    energy: dict[float, tuple[int, int]] = {}
    for tau in taus:
        target = tau * (1 - THRESHOLD_SLACK)
        first_high = int(np.searchsorted(cum_high, target)) + 1  # len+1 when no k ≤ l reaches it
        first_low = int(np.searchsorted(cum_low, target)) + 1
        energy[float(tau)] = (min(first_high, full), min(first_low, full) if first_low <= len(cum_low) else full)
    dim_eps = spectrum.tolerance / float(spectrum.S[0]) if float(spectrum.S[0]) else 0.0
    tol_low, tol_high = dim_eps * float(lower[0]), dim_eps * float(upper[0])
    beyond = full - len(lower) if spectrum.residual + spectrum.rounding > tol_low else 0
    numerical = (int((lower > tol_high).sum()), int((upper > tol_low).sum()) + beyond)
    sigma = (float(lower[0]), float(upper[0]))
    stable = (float(1.0 / hi[0] ** 2), float(1.0 / lo[0] ** 2) if lo[0] > 0 else None)
    intervals = MetricIntervals(sigma, stable, energy, numerical)

    def point(interval: tuple[int, int]) -> int | None:
        return interval[0] if interval[0] == interval[1] else None

    return RankMetrics(norm, None, None, None, None, {t: point(i) for t, i in energy.items()}, point(numerical), intervals)


# ---------------------------------------------------------------------------- entry points


def module_spectrum(
    module: Update, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32,
    base: torch.Tensor | None = None, svd: SvdOptions | SvdMethod | None = None,
) -> ModuleSpectrum:
    """Exact thin SVD of one module's ΔW (see module docstring); dtype: float32 or float64 QR.
    `base`: W₀ (d_out, d_in), for kinds whose ΔW needs it (DoRA); `svd`: how a dense ΔW is
    decomposed (`SvdOptions`; default "auto")."""
    weights = None if base is None else (lambda name, update: base)
    return next(iter_spectra([("module", module)], device, dtype, base=weights, svd=svd))[1]


def iter_spectra(
    modules: Iterable[tuple[str, Update]],
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    base: BaseWeightSource | None = None,
    source: str | None = None,
    svd: SvdOptions | SvdMethod | None = None,
) -> Iterator[tuple[str, ModuleSpectrum]]:
    """(name, spectrum) for a stream of modules, in order; `source` (the adapter's file) is named
    in errors, which name the module and the cause.

    Consecutive low-rank modules of equal factor shapes are stacked into batches of up to
    `batch_size` for one batched QR/SVD; memory stays at one batch, so a lazy reader can stream
    a large adapter. `base(name, update)` gives W₀ (d_out, d_in) to kinds that need it (DoRA);
    without it such a module is refused with one line. `svd` chooses how dense ΔW (full
    fine-tuning) are decomposed: `SvdOptions`, "auto" (default), "exact" or "randomized".
    """
    try:
        yield from _spectra_stream(modules, resolve_device(device), dtype, batch_size, base, svd_options(svd))
    except LoraAnalysisError as err:
        if source is None or (isinstance(err, InputFileError) and err.path):
            raise  # nothing to add, or it names its file already (a lazily read tensor, a base weight)
        raise InputFileError(source, str(err)) from None


def _spectra_stream(modules: Iterable[tuple[str, Update]], device: torch.device, dtype: torch.dtype,
                    batch_size: int, base: BaseWeightSource | None,
                    svd: SvdOptions) -> Iterator[tuple[str, ModuleSpectrum]]:
    batch: list[tuple[str, Update, LowRankForm]] = []
    for name, update in modules:
        form = _form_of(name, update, dtype, base)
        if batch and (not isinstance(form, LowRankForm) or _batch_key(form) != _batch_key(batch[0][2])
                      or len(batch) >= batch_size):
            yield from _flush(batch, device, dtype)
            batch = []
        if isinstance(form, LowRankForm):
            batch.append((name, update, form))
        else:
            info, factorization = update.info, _single_factorization(name, form, svd, device)
            del update, form  # a dense ΔW is not kept alive while the consumer works on its spectrum
            yield name, _checked(name, factorization, info)
    yield from _flush(batch, device, dtype)


def adapter_spectra(
    adapter: Adapter | Mapping[str, Update],
    progress: bool = True,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    base: BaseWeightSource | None = None,
    svd: SvdOptions | SvdMethod | None = None,
) -> dict[str, ModuleSpectrum]:
    """Spectrum of every module, in adapter order (see `iter_spectra`)."""
    items = adapter.items()
    source = adapter.source if isinstance(adapter, Adapter) else None
    spectra = iter_spectra(items, device, dtype, base=base, source=source, svd=svd)
    return dict(with_progress(spectra, len(items), "spectra", progress))


def with_progress(results: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    """`results` with a progress bar on stderr counting modules DONE: the bar advances when the
    consumer asks for the next result, i.e. once it has finished with the previous one (a bar
    over the inputs would reach 100 % while the last batch is still being computed)."""
    with tqdm(total=total, desc=desc, unit="module", disable=not enabled) as bar:
        for result in results:
            yield result
            bar.update()


def _form_of(name: str, update: Update, dtype: torch.dtype, base: BaseWeightSource | None) -> Form:
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        raise LoraAnalysisError(f"spectrum compute dtype must be float32 or float64, got {dtype}")
    if not update.needs_base:
        return update.factored(dtype)
    if base is None:
        raise LoraAnalysisError(
            f"module {shown(name)}: a {update.kind} update's ΔW = diag(m/‖W₀ + ΔW_dir‖)(W₀ + ΔW_dir) − W₀ needs the base "
            "weight W₀: pass base weights (--base), or ask for the direction update s·B·A alone (--dora-direction)")
    return update.factored(dtype, base(name, update))


# ---------------------------------------------------------------------------- factorizations


@dataclass
class _Factorization:
    """A module's SVD before its scale is multiplied in: ΔW = scale · U diag(S_norm) Vᵀ.

    S_norm: (m,) float64 descending; left / right: factories of the ΔW bases (U, V);
    factor_bases: of "A" / "B" where they exist; dtype / device: of the frames."""

    S_norm: torch.Tensor
    scale: Scale
    dim_eps: float  # max(d_out, d_in)·eps of the compute dtype: the relative rank tolerance
    left: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    right: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    dtype: torch.dtype
    device: torch.device
    factor_bases: dict[BasisKind, Callable[[], Basis]] = field(default_factory=dict)
    svd: DenseSVD | None = None  # a randomized dense SVD's record: its bound (before the scale)

    def vectors(self, side: str) -> torch.Tensor:
        """U ("left") or V ("right"), contiguous."""
        frame, rotation = (self.left if side == "left" else self.right)()
        return (frame if rotation is None else frame @ rotation.to(frame)).contiguous()


def _spectrum(factorization: _Factorization, info: UpdateInfo) -> ModuleSpectrum:
    S = factorization.scale.apply(factorization.S_norm)
    relative = factorization.dim_eps * float(factorization.S_norm[0]) if factorization.S_norm.numel() else 0.0
    rank = numerical_rank(factorization.S_norm, relative)
    tolerance = float(factorization.dim_eps * S[0]) if S.numel() else 0.0

    def basis(side: str, kind: BasisKind) -> Callable[[], Basis]:
        def make() -> Basis:
            frame, rotation = (factorization.left if side == "left" else factorization.right)()
            return Basis(frame, rotation, S, rank, kind)
        return make

    factories: dict[BasisKind, Callable[[], Basis]] = {
        "dW-left": basis("left", "dW-left"), "dW-right": basis("right", "dW-right"), **factorization.factor_bases}
    svd = factorization.svd
    if svd is None or svd.exact:
        return ModuleSpectrum(S, rank, tolerance, info, factorization.dtype, factorization.device, factories)
    residual, rounding, total = (float(x) for x in factorization.scale.apply(
        torch.tensor([svd.residual, svd.rounding, svd.frobenius or 0.0], dtype=torch.float64)))
    return ModuleSpectrum(S, rank, tolerance, info, factorization.dtype, factorization.device, factories,
                          exact=False, residual=residual, rounding=rounding, total_norm=total)


def _checked(name: str, factorization: _Factorization, info: UpdateInfo) -> ModuleSpectrum:
    """The spectrum, or a refusal where float64 cannot hold it: σ₁ overflowing, or a singular
    value above the numerical-rank tolerance below the normal range (its digits would be lost)."""
    spectrum = _spectrum(factorization, info)
    S = spectrum.S
    if S.numel() and not math.isfinite(float(S[0])):
        scale = factorization.scale
        log10_sigma = (math.log10(float(factorization.S_norm[0])) + math.log10(abs(scale.value))
                       + scale.exponent * math.log10(2))
        raise LoraAnalysisError(
            f"module {shown(name)}: σ₁ of ΔW is about 1e{log10_sigma:.0f} (scale s = {spectrum.scale:.3g}): "
            "it overflows float64 (largest 1.8e308), not representable")
    kept = S[: spectrum.numerical_rank]
    if kept.numel() and float(kept[-1]) < FLOAT64_TINY:
        raise LoraAnalysisError(
            f"module {shown(name)}: singular values of ΔW down to {float(kept[-1]):.3g} lie below float64's normal range "
            f"({FLOAT64_TINY:.3g}): not representable to float64 precision")
    return spectrum


def _single_factorization(name: str, form: Form, svd: SvdOptions, device: torch.device) -> _Factorization:
    try:
        factorization = _dense(form, svd, device) if isinstance(form, DenseForm) else _factorize(form)
    except torch.linalg.LinAlgError:
        raise LoraAnalysisError(f"module {shown(name)}: the SVD did not converge (LAPACK)") from None
    if not torch.isfinite(factorization.S_norm).all():
        raise LoraAnalysisError(f"module {shown(name)}: its factors or ΔW contain NaN or Inf")
    return factorization


def _factorize(form: Form) -> _Factorization:
    """The unscaled exact SVD of one form, in float64 on the CPU (small forms, and the parts of
    Kronecker and block-diagonal forms)."""
    if isinstance(form, LowRankForm):
        return _low_rank_batch([form], torch.device("cpu"), torch.float64)[0]
    if isinstance(form, DenseForm):
        return _dense(form, SvdOptions(method="exact"), torch.device("cpu"))
    if isinstance(form, KroneckerForm):
        return _kronecker(form)
    return _block_diagonal(form)


def _dense(form: DenseForm, svd: SvdOptions, device: torch.device) -> _Factorization:
    M, exponent = _normalized_dense(form.M)
    result = dense_svd(M, svd, device)
    del M
    return _Factorization(
        result.S, form.scale.times(1.0, exponent), max(form.shape) * torch.finfo(torch.float64).eps,
        lambda: (result.U, None), lambda: (result.V, None), torch.float64, torch.device("cpu"), svd=result,
    )


def _normalized_dense(M: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(M·2**-e in float64, e) for the SVD: a float64 M whose largest entry is within 2**±256 is
    taken as is (e = 0, no copy: IEEE arithmetic is exactly equivariant under powers of two away
    from over- and underflow, which that range keeps far off); else a normalized copy."""
    exponent = peak_exponent(M)
    if M.dtype == torch.float64 and abs(exponent) <= 256:
        return M, 0
    return normalized(M, torch.float64)


def _kronecker(form: KroneckerForm) -> _Factorization:
    """σ(L ⊗ R) = {σᵢ(L)σⱼ(R)}, u = uᵢ ⊗ u'ⱼ, v = vᵢ ⊗ v'ⱼ, sorted by σ (all in float64)."""
    left, right = _factorize(form.left), _factorize(form.right)
    products = torch.kron(left.S_norm, right.S_norm)
    order = torch.argsort(products, descending=True, stable=True)
    d_out, d_in = form.shape

    def side(name: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
        return lambda: (kron(left.vectors(name), right.vectors(name))[:, order], None)

    return _Factorization(
        products[order], form.scale.times(left.scale).times(right.scale),
        max(d_out, d_in) * torch.finfo(torch.float64).eps, side("left"), side("right"),
        torch.float64, torch.device("cpu"),
    )


def kron(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X ⊗ Y of matrices X: (m1, k1), Y: (m2, k2) → (m1·m2, k1·k2)."""
    return (X[:, None, :, None] * Y[None, :, None, :]).reshape(X.shape[0] * Y.shape[0], X.shape[1] * Y.shape[1])


def _block_diagonal(form: BlockDiagonalForm) -> _Factorization:
    """The union of the blocks' spectra (on the largest block's scale), vectors placed per block."""
    parts = [_factorize(block) for block in form.blocks]
    top = max(parts, key=lambda p: p.scale.exponent if p.scale.value else -(2**62)).scale
    values = torch.cat([_on_scale(part, top) for part in parts])
    order = torch.argsort(values, descending=True, stable=True)

    def side(name: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
        return lambda: (torch.block_diag(*(p.vectors(name).double() for p in parts))[:, order], None)

    d_out, d_in = form.shape
    return _Factorization(
        values[order], top, max(d_out, d_in) * torch.finfo(torch.float64).eps,
        side("left"), side("right"), torch.float64, torch.device("cpu"),
    )


def _on_scale(part: _Factorization, top: Scale) -> torch.Tensor:
    """part's singular values S_norm·part.scale written on `top`'s scale: S_norm·(part.scale / top)."""
    if not top.value:
        return torch.zeros_like(part.S_norm)
    return Scale(part.scale.value / top.value, part.scale.exponent - top.exponent).apply(part.S_norm)


# ---------------------------------------------------------------------------- the low-rank route


def _batch_key(form: LowRankForm) -> tuple:
    return (tuple(form.B.shape), tuple(form.A.shape), form.e is not None, form.factor_bases,
            torch.float64 in (form.B.dtype, form.A.dtype))


def _flush(batch: list[tuple[str, Update, LowRankForm]], device: torch.device, dtype: torch.dtype):
    if not batch:
        return
    forms = [form for _, _, form in batch]
    try:
        factorizations: list[_Factorization] | None = _low_rank_batch(forms, device, dtype)
    except torch.linalg.LinAlgError:
        factorizations = None
    if factorizations is None or not all(torch.isfinite(f.S_norm).all() for f in factorizations):
        # Only on failure: find the culprit rather than scanning every factor up front.
        for name, _, form in batch:
            if not (torch.isfinite(form.A).all() and torch.isfinite(form.B).all()):
                raise LoraAnalysisError(f"module {shown(name)}: its LoRA factors contain NaN or Inf")
        raise LoraAnalysisError(f"module {shown(batch[0][0])}: the SVD did not converge (LAPACK)")
    for (name, update, _), factorization in zip(batch, factorizations):
        yield name, _checked(name, factorization, update.info)


def _compute_dtype(form: LowRankForm, dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (form.A.dtype, form.B.dtype) else dtype


def _low_rank_batch(forms: list[LowRankForm], device: torch.device, dtype: torch.dtype) -> list[_Factorization]:
    """Factorizations of low-rank forms with equal factor shapes: one batched QR per factor (on
    the normalized factors), one batched float64 core SVD."""
    first = forms[0]
    dtype = _compute_dtype(first, dtype)
    (d_out, k), d_in = first.B.shape, first.A.shape[1]
    # Filled with one converting copy per factor and laid out column-major (the .mT views), so
    # LAPACK/cuSOLVER take them without another copy; then scaled in place by a power of two.
    Bt = torch.empty(len(forms), k, d_out, device=device, dtype=dtype)
    A = torch.empty(len(forms), k, d_in, device=device, dtype=dtype)
    exponents: list[tuple[int, int]] = []
    for i, form in enumerate(forms):
        Bt[i].copy_(form.B.T)  # exact: the compute dtype holds every value of the factor's
        A[i].copy_(form.A)
        e_B, e_A = peak_exponent(Bt[i]), peak_exponent(A[i])
        times_power_of_two_(Bt[i], -e_B)
        times_power_of_two_(A[i], -e_A)
        exponents.append((e_B, e_A))
    Q_B, R_B = torch.linalg.qr(Bt.mT)  # B: (n, d_out, k)
    Q_A, R_A = torch.linalg.qr(A.mT)  # Aᵀ: (n, d_in, k)
    del Bt, A
    # The k × k core in float64 on the CPU: tiny, and exact to double precision.
    R_B, R_A = R_B.to("cpu", torch.float64), R_A.to("cpu", torch.float64)
    scales = [form.scale.times(1.0, e_B + e_A) for form, (e_B, e_A) in zip(forms, exponents)]
    if first.e is not None:
        es = []
        for i, form in enumerate(forms):
            assert form.e is not None
            e, e_exponent = normalized(form.e.reshape(-1), torch.float64)
            es.append(e)
            scales[i] = scales[i].times(1.0, e_exponent)
        core = (R_B * torch.stack(es)[:, None, :]) @ R_A.mT
    else:
        core = R_B @ R_A.mT
    core_U, S, core_Vh = torch.linalg.svd(core, full_matrices=False)
    dim_eps = max(d_out, d_in) * torch.finfo(dtype).eps
    return [
        _Factorization(
            S[i], scales[i], dim_eps,
            _frame(Q_B[i], core_U[i]), _frame(Q_A[i], core_Vh[i].mT), dtype, device,
            _factor_bases(Q_A[i], R_A[i], Q_B[i], R_B[i], exponents[i], k, d_out, d_in, dtype)
            if forms[i].factor_bases else {},
        )
        for i in range(len(forms))
    ]


def _frame(Q: torch.Tensor, rotation: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    return lambda: (Q, rotation)


def _factor_bases(Q_A: torch.Tensor, R_A: torch.Tensor, Q_B: torch.Tensor, R_B: torch.Tensor,
                  exponents: tuple[int, int], k: int, d_out: int, d_in: int,
                  dtype: torch.dtype) -> dict[BasisKind, Callable[[], Basis]]:
    """Bases "A" (right-singular vectors of A) and "B" (left-singular vectors of B) from the QR
    factors of the normalized factors (2**-e·A has A's singular vectors and σ(A)·2**-e)."""
    eps = torch.finfo(dtype).eps
    e_B, e_A = exponents

    def basis_a() -> Basis:  # A = R_Aᵀ Q_Aᵀ; R_Aᵀ = P Σ Tᵀ  ⇒  right vectors of A: Q_A T
        _, sv, th = torch.linalg.svd(R_A.T, full_matrices=False)
        rank = numerical_rank(sv, rank_tolerance(sv, max(k, d_in), eps))
        return Basis(Q_A, th.T, Scale(1.0, e_A).apply(sv), rank, "A")

    def basis_b() -> Basis:  # B = Q_B R_B; R_B = P Σ Tᵀ  ⇒  left vectors of B: Q_B P
        p, sv, _ = torch.linalg.svd(R_B, full_matrices=False)
        rank = numerical_rank(sv, rank_tolerance(sv, max(k, d_out), eps))
        return Basis(Q_B, p, Scale(1.0, e_B).apply(sv), rank, "B")

    return {"A": basis_a, "B": basis_b}

