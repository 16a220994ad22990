"""Factored SVD of ΔW and rank metrics, against float64 SVDs of the materialized ΔW and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from lora_analysis import Adapter, LoraConfig, LoraModule, extract_adapter, inject_lora
from lora_analysis.analysis import AnalysisOptions, adapter_spectra, analyze_adapter, iter_spectra, module_spectrum, rank_metrics
from lora_analysis.errors import LoraAnalysisError
from lora_test_utils import randomize_lora


def make_module(d_out, d_in, r, seed=0, rank=None, alpha=None, dtype=torch.float32, **kwargs) -> LoraModule:
    """Random factors; `rank` < r makes B rank-deficient (B = B₁C with B₁: (d_out, rank))."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    if rank is None:
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    else:
        B = torch.randn(d_out, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, r, generator=g, dtype=torch.float64)
    return LoraModule(A=A.to(dtype), B=B.to(dtype), alpha=2.0 * r if alpha is None else alpha, **kwargs)


def linear_delta(m: LoraModule) -> torch.Tensor:
    """Oracle ΔW in the Linear orientation (d_out, d_in), float64."""
    return m.scale * (m.B.double() @ m.A.double())


def projector(U: torch.Tensor) -> torch.Tensor:
    U = U.double()
    return U @ U.T


SHAPES = {
    "square": (24, 24, 6, None),
    "wide": (10, 40, 4, None),
    "tall": (40, 10, 4, None),
    "r=1": (30, 25, 1, None),
    "rank-deficient": (30, 20, 6, 2),
    "r>d": (5, 7, 8, None),
}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", SHAPES)
def test_spectrum_matches_svd_of_materialized_delta(case, dtype, rtol):
    d_out, d_in, r, rank = SHAPES[case]
    m = make_module(d_out, d_in, r, rank=rank, dtype=dtype)
    spec = module_spectrum(m, device="cpu", dtype=dtype)
    dW = linear_delta(m)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(dW)
    # The numpy matrix_rank rule at the compute precision (float32 rounding of a rank-2 B
    # leaves singular values ~1e-7·σ₁ that are noise at that precision).
    true_rank = int(torch.linalg.matrix_rank(dW, rtol=max(d_out, d_in) * torch.finfo(dtype).eps))
    assert true_rank == (rank or min(r, d_out, d_in))
    m_dim = min(r, d_out, d_in)
    assert spec.S.dtype == torch.float64 and spec.S.shape == (m_dim,)
    assert spec.U.shape == (d_out, m_dim) and spec.V.shape == (d_in, m_dim)
    assert spec.numerical_rank == true_rank
    torch.testing.assert_close(spec.S[:true_rank], S_ref[:true_rank], rtol=rtol, atol=0)
    assert (spec.S[true_rank:] <= spec.tolerance).all()
    # Subspaces: projectors onto the top-k singular vectors, for each k (distinct σ here).
    for k in range(1, true_rank + 1):
        torch.testing.assert_close(projector(spec.U[:, :k]), projector(U_ref[:, :k]), atol=50 * rtol, rtol=0)
        torch.testing.assert_close(projector(spec.V[:, :k]), projector(Vh_ref[:k].T), atol=50 * rtol, rtol=0)
    # Orthonormal columns and exact reconstruction.
    torch.testing.assert_close(spec.U.double().T @ spec.U.double(), torch.eye(m_dim, dtype=torch.float64), atol=10 * rtol, rtol=0)
    reconstructed = (spec.U.double() * spec.S) @ spec.V.double().T
    torch.testing.assert_close(reconstructed, dW, atol=10 * rtol * float(S_ref[0]), rtol=0)


def test_zero_B_gives_empty_spectrum():
    m = make_module(12, 9, 4)
    m.B = torch.zeros_like(m.B)
    spec = module_spectrum(m, device="cpu")
    assert spec.numerical_rank == 0
    assert torch.equal(spec.S, torch.zeros(4, dtype=torch.float64))
    metrics = spec.metrics()
    assert (metrics.frobenius, metrics.stable_rank, metrics.numerical_rank) == (0.0, 0.0, 0)
    assert metrics.energy_rank == {0.9: 0, 0.99: 0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_are_upcast(dtype):
    m = make_module(32, 48, 8, dtype=dtype)
    spec = module_spectrum(m, device="cpu")
    S_ref = torch.linalg.svdvals(linear_delta(m))[:8]  # of the half-precision values themselves
    torch.testing.assert_close(spec.S, S_ref, rtol=1e-5, atol=0)
    assert spec.Q_B.dtype == torch.float32


def test_fan_in_fan_out_keeps_output_space_on_the_left():
    m = make_module(20, 12, 4, fan_in_fan_out=True)
    spec = module_spectrum(m, device="cpu", dtype=torch.float64)
    stored = m.delta_weight(torch.float64)  # Conv1D storage: (d_in, d_out)
    assert stored.shape == (12, 20) and spec.shape == (20, 12)
    torch.testing.assert_close((spec.U * spec.S) @ spec.V.T, stored.T)


def test_scale_alpha_and_rslora():
    base = make_module(16, 16, 4, alpha=4.0)
    rs = make_module(16, 16, 4, alpha=4.0, use_rslora=True)
    s1 = module_spectrum(base, device="cpu").S
    s2 = module_spectrum(rs, device="cpu").S
    torch.testing.assert_close(s2 / s1, torch.full((4,), 4.0 / 2.0 / (4.0 / 4.0), dtype=torch.float64))


def test_batched_spectra_equal_single_module_spectra_in_adapter_order():
    modules = {
        "l.0.q": make_module(16, 16, 4, seed=1),
        "l.0.up": make_module(32, 16, 4, seed=2),
        "l.1.q": make_module(16, 16, 4, seed=3),
        "l.2.q": make_module(16, 16, 4, seed=4),
        "l.3.q": make_module(16, 16, 4, seed=5),
    }
    spectra = adapter_spectra(Adapter(modules), progress=False, device="cpu")
    assert list(spectra) == list(modules)
    for name, m in modules.items():
        single = module_spectrum(m, device="cpu")
        torch.testing.assert_close(spectra[name].S, single.S)
        torch.testing.assert_close(projector(spectra[name].U), projector(single.U), atol=1e-5, rtol=0)
    streamed = dict(iter_spectra(modules.items(), device="cpu", batch_size=2))
    for name in modules:
        torch.testing.assert_close(streamed[name].S, spectra[name].S)


@pytest.mark.parametrize("case", ["square", "wide", "tall", "r>d", "rank-deficient"])
def test_factor_bases_match_svd_of_each_factor(case):
    d_out, d_in, r, rank = SHAPES[case]
    m = make_module(d_out, d_in, r, rank=rank, dtype=torch.float64)
    spec = module_spectrum(m, device="cpu", dtype=torch.float64)
    for kind, factor, take in (("A", m.A, lambda U, Vh: Vh.T), ("B", m.B, lambda U, Vh: U)):
        U, S, Vh = torch.linalg.svd(factor.double(), full_matrices=False)
        ref = take(U, Vh)
        basis = spec.basis(kind)
        true_rank = int(torch.linalg.matrix_rank(factor.double()))
        assert basis.rank == true_rank and basis.kind == kind
        torch.testing.assert_close(basis.singular_values[:true_rank], S[:true_rank], rtol=1e-10, atol=0)
        for k in range(1, true_rank + 1):
            torch.testing.assert_close(projector(basis.vectors[:, :k]), projector(ref[:, :k]), atol=1e-8, rtol=0)
    assert spec.basis("dW-left").vectors is spec.U
    with pytest.raises(LoraAnalysisError, match="unknown basis"):
        spec.basis("C")


def test_rank_metrics_against_direct_formulas():
    S = np.array([0.5, 3.0, 0.0, 2.0, 1.0])  # any order
    m = rank_metrics(S, taus=(0.5, 0.9, 0.99, 1.0))
    s = np.array([3.0, 2.0, 1.0, 0.5])
    energy = (s**2).sum()  # 14.25
    assert m.frobenius == pytest.approx(math.sqrt(14.25))
    assert m.sigma_max == 3.0
    assert m.stable_rank == pytest.approx(14.25 / 9)
    assert m.roy_vetterli_rank == pytest.approx(math.exp(scipy.stats.entropy(s / s.sum())))
    assert m.energy_effective_rank == pytest.approx(math.exp(scipy.stats.entropy(s**2 / energy)))
    # cumulative energy fractions: 9/14.25 = .632, 13/14.25 = .912, 14/14.25 = .982, 1
    assert m.energy_rank == {0.5: 1, 0.9: 2, 0.99: 4, 1.0: 4}
    assert m.numerical_rank == 4


def test_rank_metrics_flat_spectrum_and_tolerance():
    flat = rank_metrics(np.ones(4), taus=(0.5, 0.75))
    assert flat.energy_rank == {0.5: 2, 0.75: 3}  # exact thresholds, despite rounding
    for value in (flat.stable_rank, flat.roy_vetterli_rank, flat.energy_effective_rank):
        assert value == pytest.approx(4.0)
    truncated = rank_metrics(torch.tensor([2.0, 1.0, 1e-9]), tolerance=1e-6)
    assert truncated.numerical_rank == 2
    assert truncated.frobenius == pytest.approx(math.sqrt(5.0))
    with pytest.raises(LoraAnalysisError, match="tau"):
        rank_metrics(np.ones(3), taus=(1.5,))


def test_adapter_from_lora_core_and_analyze_without_base(tiny_gpt2):
    model = inject_lora(tiny_gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]), seed=0)
    randomize_lora(model, seed=0)
    adapter = extract_adapter(model)
    analysis = analyze_adapter(adapter, options=AnalysisOptions(taus=(0.8,), device="cpu"), progress=False)
    assert list(analysis.modules) == list(adapter.modules)
    for name, result in analysis.modules.items():
        stored = adapter[name].delta_weight(torch.float64)  # Conv1D: (d_in, d_out)
        S_ref = torch.linalg.svdvals(stored)[:4]
        torch.testing.assert_close(result.spectrum.S, S_ref, rtol=1e-5, atol=0)
        assert result.metrics.frobenius == pytest.approx(float(torch.linalg.matrix_norm(stored)), rel=1e-5)
        assert set(result.metrics.energy_rank) == {0.8}
        assert result.projection is None and result.intruders is None


def test_non_finite_factors_are_named():
    good, bad = make_module(8, 6, 2, seed=1), make_module(8, 6, 2, seed=2)
    bad.A[0, 3] = float("inf")
    with pytest.raises(LoraAnalysisError, match=r"module l\.1\.q: LoRA factors contain NaN or Inf"):
        adapter_spectra(Adapter({"l.0.q": good, "l.1.q": bad}), progress=False, device="cpu")
