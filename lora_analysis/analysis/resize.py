"""The best adapter of a smaller rank: per-module truncated SVD of ΔW from its exact factored form.

By Eckart–Young, the best rank-k approximation of ΔW = U Σ Vᵀ (d_out, d_in) in the Frobenius
(and spectral) norm is ΔW_k = U_k Σ_k V_kᵀ, with

    ‖ΔW − ΔW_k‖_F = √Σ_{i>k} σᵢ²            (the tail of the spectrum, exact)

As a LoRA module: B' = U_k Σ_k^{1/2}: (d_out, k), A' = Σ_k^{1/2} V_kᵀ: (k, d_in), α' = k, so
s' = α'/k = 1 holds exactly and ΔW_k = s'·B'A'. The SVD is that of the analysis
(`iter_spectra`, in float64: QR of the factors and an r × r core for the low-rank kinds, never
forming d_out × d_in; a formed matrix only for dense kinds such as full fine-tuning's
W_ft − W₀), so any readable kind can be resized (LoRA, AdaLoRA, LoHa, LoKr, DoRA with W₀,
dense), and `extract` is this applied to a model pair's dense ΔW.

The rank k of each module follows one rule (`RankRule`), applied to each module's own spectrum
σ₁ ≥ σ₂ ≥ … (numerically zero values, ≤ max(d_out, d_in)·eps·σ₁, never kept):

    rank R        k = min(R, numerical rank)
    energy τ      smallest k with Σ_{i≤k}σᵢ² ≥ τ·Σσᵢ²          (`rank_metrics`' energy rank)
    sv_ratio x    k = #{i: σᵢ ≥ σ₁/x}                          (kohya's sv_ratio, x ≥ 1)
    fro f         smallest k with √Σ_{i≤k}σᵢ² ≥ f·‖ΔW‖_F       (kohya's sv_fro; = energy f²)

Thresholds are met within a relative 1e-12 (`THRESHOLD_SLACK`), so a σ exactly at σ₁/x or an
energy exactly at τ counts despite the SVD's rounding.

A module whose ΔW is 0 (numerical rank 0) has no rank-k form; it is left out and listed.
Factors are written in float32 (PEFT's dtype); a factor entry that float32 cannot hold is
refused with one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping

import numpy as np
import torch

from ..adapters import Adapter, LoraModule, Update
from ..config import LoraConfig
from ..errors import LoraAnalysisError, shown
from .dense_svd import SvdMethod, SvdOptions, svd_options
from .spectrum import THRESHOLD_SLACK, BaseWeightSource, ModuleSpectrum, iter_spectra, rank_metrics, with_progress

RuleKind = Literal["rank", "energy", "sv_ratio", "fro"]


@dataclass(frozen=True)
class RankRule:
    """How each module's new rank k is chosen (see the module docstring)."""

    kind: RuleKind
    value: float

    def __post_init__(self) -> None:
        ok = {"rank": self.value >= 1 and float(self.value).is_integer(), "energy": 0 < self.value <= 1,
              "sv_ratio": self.value >= 1, "fro": 0 < self.value <= 1}
        if self.kind not in ok:
            raise LoraAnalysisError(f"unknown rank rule {self.kind!r}: use rank, energy, sv_ratio or fro")
        if not ok[self.kind] or not math.isfinite(self.value):
            expected = {"rank": "an integer ≥ 1", "energy": "in (0, 1]", "sv_ratio": "≥ 1", "fro": "in (0, 1]"}
            raise LoraAnalysisError(f"--{self.kind.replace('_', '-')} must be {expected[self.kind]}, got {self.value}")

    def rank(self, spectrum: ModuleSpectrum) -> int:
        """k for one module's spectrum: 0 only for ΔW = 0."""
        S, rank = spectrum.S.detach().cpu().numpy(), spectrum.numerical_rank
        if rank == 0:
            return 0
        if self.kind == "rank":
            if not spectrum.resolved and int(self.value) >= len(S):
                raise LoraAnalysisError(f"--rank {int(self.value)}: the randomized SVD's sketch of this {spectrum.kind} "
                                        f"module has only {len(S)} columns: use --svd exact")
            return min(int(self.value), rank)
        if self.kind == "sv_ratio":
            return int(np.count_nonzero(S[:rank] / S[0] >= (1.0 - THRESHOLD_SLACK) / self.value))
        tau = self.value if self.kind == "energy" else self.value**2
        if spectrum.resolved:
            exact = rank_metrics(S, [tau], spectrum.tolerance).energy_rank[tau]
            assert exact is not None  # rank_metrics of a whole spectrum gives every rank
            return exact
        # randomized: the smallest k whose truncation of Q·B keeps τ of ‖ΔW‖²_F (= Σσ(B)² + residual²)
        ratio = S[:rank] / S[0]
        kept = np.cumsum(ratio**2) / (np.square(S / S[0]).sum() + (spectrum.residual / S[0]) ** 2)
        k = int(np.searchsorted(kept, tau * (1 - THRESHOLD_SLACK))) + 1
        if k > rank:
            raise LoraAnalysisError(
                f"--{self.kind.replace('_', '-')} {self.value}: the randomized SVD's sketch of this {spectrum.kind} module "
                f"holds {100 * float(kept[-1]):.6g}% of ‖ΔW‖²_F, less than asked: use --svd exact")
        return k

    def describe(self) -> str:
        value = int(self.value) if self.kind == "rank" else self.value
        return f"{self.kind.replace('_', '-')} {value}"


@dataclass(frozen=True)
class ModuleResize:
    """One module's cut. rank_before: the input's r (None where the kind has none, e.g. dense);
    numerical_rank: of ΔW (None where a randomized SVD leaves it open); rank: k kept; frobenius: ‖ΔW‖_F; error: ‖ΔW − ΔW_k‖_F = √Σ_{i>k}σᵢ²;
    energy_kept: Σ_{i≤k}σᵢ² / Σσᵢ²; parameters_before / _after: the input's and k·(d_out + d_in);
    svd: "exact" or "randomized" (then error and energy_kept are those of the truncation written,
    exact, and svd_residual = ‖(I − QQᵀ)ΔW‖_F bounds its excess over the optimum: `truncation`)."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank_before: int | None
    numerical_rank: int | None
    rank: int
    frobenius: float
    error: float
    energy_kept: float
    parameters_before: int
    parameters_after: int
    svd: str = "exact"
    svd_residual: float = 0.0


@dataclass
class ResizeResult:
    """The resized adapter (plain LoRA modules, PEFT-writable), one `ModuleResize` per module in
    input order (rank 0: ΔW = 0, left out of the adapter), and notes for reports."""

    adapter: Adapter
    modules: dict[str, ModuleResize]
    rule: RankRule
    notes: list[str] = field(default_factory=list)

    @property
    def left_out(self) -> list[str]:
        return [name for name, m in self.modules.items() if m.rank == 0]

    @property
    def energy_kept(self) -> float:
        """Energy kept over all modules, Σ_m ‖ΔW_m,k‖²_F / Σ_m ‖ΔW_m‖²_F: each module's own
        ratio weighted by (‖ΔW_m‖_F / max_m ‖ΔW_m‖_F)² (no overflow of squared norms). For a fixed
        adapter it is non-decreasing in every module's k."""
        weights, kept = self._weights(), [m.energy_kept for m in self.modules.values()]
        total = float(np.sum(weights))
        return float(np.dot(weights, kept)) / total if total else 1.0

    @property
    def relative_error(self) -> float:
        """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over all modules (the stacked updates): √(Σ_m err_m² / Σ_m ‖ΔW_m‖²_F),
        errors and norms each scaled by their largest (no overflow or underflow of the squares)."""
        errors = [m.error for m in self.modules.values()]
        largest_error, largest_norm = max(errors, default=0.0), max((m.frobenius for m in self.modules.values()), default=0.0)
        if not largest_error or not largest_norm:
            return 0.0
        tails = float(np.sum(np.square(np.asarray(errors) / largest_error)))
        return largest_error / largest_norm * math.sqrt(tails / float(np.sum(self._weights())))

    def _weights(self) -> np.ndarray:
        scale = max((m.frobenius for m in self.modules.values()), default=0.0)
        return np.square([m.frobenius / scale if scale else 0.0 for m in self.modules.values()])


def truncation(spectrum: ModuleSpectrum, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(B' (d_out, k), A' (k, d_in), ‖ΔW − ΔW_k‖_F, energy kept) of the best rank-k approximation,
    B' = U_k Σ_k^{1/2}, A' = Σ_k^{1/2} V_kᵀ in float64 (ΔW_k = B'A'). Tail and energy are computed
    on σ/σ₁ (no under- or overflow of σ²).

    From a randomized SVD (S = σ(B), U = Q·U_B, residual ‖E‖_F = ‖(I − QQᵀ)ΔW‖_F): ΔW_k is the
    truncation Q·B_k, whose error is exactly √(‖E‖²_F + Σ_{i>k}σᵢ(B)²) (E ⟂ range Q); the optimum's
    squared error is at least Σ_{i>k}σᵢ(B)² (Ky Fan), so ours exceeds it by at most ‖E‖²_F."""
    S = spectrum.S.detach().cpu().double()
    U, V = spectrum.computed_basis("dW-left").vectors, spectrum.computed_basis("dW-right").vectors
    root = S[:k].sqrt().to(U.device)
    B = U[:, :k].double() * root
    A = (V[:, :k].double() * root).T
    ratio = (S / S[0]).numpy() if S.numel() and float(S[0]) > 0 else np.zeros(0)
    residual = spectrum.residual / float(S[0]) if S.numel() and float(S[0]) > 0 else 0.0  # ‖(I − QQᵀ)ΔW‖_F, 0 when exact
    total = float(np.square(ratio).sum()) + residual**2
    tail = float(np.square(ratio[k:]).sum()) + residual**2
    error = float(S[0]) * math.sqrt(tail) if tail else 0.0
    kept = 1.0 - tail / total if total else 1.0
    return B, A, error, kept


def resize_adapter(
    adapter: Adapter,
    rule: RankRule,
    *,
    base: BaseWeightSource | None = None,
    config: LoraConfig | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    svd: SvdOptions | SvdMethod | None = None,
) -> ResizeResult:
    """The best adapter of the ranks `rule` chooses, module by module (see the module docstring).

    `base(name, update)` gives W₀ to kinds whose ΔW needs it (DoRA). `config`: task type and base
    model of the output (ranks and α are set per module); by default the input's. Modules are
    streamed: one module's factors and singular vectors are resident at a time. Unknown α, conv
    kernels, fused experts and embeddings are refused before any work (`_check_writable`).
    `svd`: how dense ΔW are decomposed (`SvdOptions`; a --rank R rule makes the sketch hold ≥ R + 10).
    """
    _check_writable(adapter)
    options = svd_options(svd)
    if rule.kind == "rank":
        options = replace(options, min_rank=max(options.min_rank, int(rule.value)))
    spectra = iter_spectra(adapter.items(), device, torch.float64, base=base, svd=options)
    modules: dict[str, Update] = {}
    cuts: dict[str, ModuleResize] = {}
    for name, spectrum in with_progress(spectra, len(adapter), "resize", progress):
        info = adapter.info(name)
        k = rule.rank(spectrum)
        B, A, error, kept = truncation(spectrum, k)
        numerical_rank = spectrum.numerical_rank if spectrum.resolved else None  # the sketch's count is not ΔW's
        cuts[name] = ModuleResize(name, info.kind, info.shape, info.r, numerical_rank, k,
                                  spectrum.frobenius_norm, error, kept, info.parameters, k * sum(info.shape),
                                  spectrum.method, spectrum.residual)
        spectrum.release_vectors()
        if k:
            modules[name] = LoraModule(A=_float32(A, name, "A"), B=_float32(B, name, "B"), alpha=float(k),
                                       fan_in_fan_out=info.storage.transposed is True, transposed=info.storage.transposed)
    if not modules:
        raise LoraAnalysisError(f"{adapter.source or 'adapter'}: every module's ΔW is 0: nothing to resize")
    source = config or adapter.config
    ranks = [m.r for m in modules.values() if isinstance(m, LoraModule)]
    out_config = LoraConfig(
        r=max(set(ranks), key=ranks.count), lora_alpha=float(max(set(ranks), key=ranks.count)), target_modules=list(modules),
        task_type=source.task_type, base_model_name_or_path=source.base_model_name_or_path,
        modules_to_save=source.modules_to_save if adapter.extra_tensors else None,
    )
    resized = Adapter(modules, out_config, dict(adapter.extra_tensors), source_format="ours")
    result = ResizeResult(resized, cuts, rule)
    if result.left_out:
        result.notes.append(f"{len(result.left_out)} module(s) with ΔW = 0 left out (e.g. {result.left_out[0]})")
    return result


def _check_writable(adapter: Adapter) -> None:
    """Refuse, before any work, what the output cannot hold exactly: an unknown α (ΔW known only
    up to s), conv kernels, fused experts, and transposed weights other than Conv1D (embeddings:
    PEFT's lora_embedding_A/B layout), told by the input config's fan_in_fan_out."""
    where = adapter.source or "adapter"
    for name in adapter.modules:
        info = adapter.info(name)
        if not info.alpha_known:
            raise LoraAnalysisError(f"{where}: LoRA alpha of module {shown(name)} is unknown, so ΔW is known only up to "
                                    "its scale: pass --alpha")
        conv1d = info.storage.transposed is True and adapter.config.fan_in_fan_out
        if info.storage.kernel or info.storage.experts or (info.storage.transposed is True and not conv1d):
            raise LoraAnalysisError(f"{where}: module {shown(name)} is a {info.kind} update on a {info.storage.describe()} "
                                    "weight: resize writes LoRA on Linear (and Conv1D) layers only")


def _float32(factor: torch.Tensor, name: str, which: str) -> torch.Tensor:
    out = factor.to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(out).all():
        raise LoraAnalysisError(f"module {shown(name)}: factor {which} of the truncation overflows float32")
    return out


def resize_table(modules: Mapping[str, ModuleResize]) -> list[dict]:
    """The per-module numbers as JSON-ready rows (no NaN or Infinity: every value is finite)."""
    return [{"module": m.name, "kind": m.kind, "shape": list(m.shape), "rank_before": m.rank_before,
             "numerical_rank": m.numerical_rank, "rank": m.rank, "frobenius": m.frobenius, "error": m.error,
             "relative_error": m.error / m.frobenius if m.frobenius else 0.0, "energy_kept": m.energy_kept,
             "parameters_before": m.parameters_before, "parameters_after": m.parameters_after,
             "svd": m.svd, "svd_residual": m.svd_residual}
            for m in modules.values()]
