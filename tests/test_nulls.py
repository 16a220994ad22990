"""Null distributions: closed forms against Monte Carlo on real matrices (not the diagonal shortcut)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import beta, kstest

from lora_analysis.analysis.similarity import phi_grid
from lora_analysis.analysis.nulls import (
    BetaLaw,
    haar_frames,
    phi_column_null,
    phi_null_band,
    projection_null_moments,
    projection_null_samples,
)
from lora_analysis.errors import LoraAnalysisError
from lora_analysis.seeding import seeded_generator


def _other_frames(d: int, k: int, count: int, seed: int) -> torch.Tensor:
    """Haar frames by Cholesky (Q = G R⁻¹ with RᵀR = GᵀG, the Q of G's QR with a positive
    diagonal): a sampler independent of `haar_frames` (Householder QR)."""
    G = torch.randn(count, d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    L = torch.linalg.cholesky(G.mT @ G)
    return torch.linalg.solve_triangular(L, G.mT, upper=False).mT


def _frames(d: int, k: int, count: int, seed: int) -> torch.Tensor:
    return haar_frames(d, k, count, seeded_generator(seed, "test"))


def _direct_norms(W: torch.Tensor, r: int, count: int, seed: int) -> np.ndarray:
    """‖UᵀWV‖_F with the full W, U and V from `_other_frames`."""
    U, V = _other_frames(W.shape[0], r, count, seed), _other_frames(W.shape[1], r, count, seed + 1)
    return torch.linalg.matrix_norm(U.mT @ W @ V).numpy()


def _weight(d_out: int, d_in: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((d_out, d_in)) * np.linspace(0.2, 3.0, d_in)  # uneven spectrum


@pytest.mark.parametrize("d_out, d_in, r", [(9, 6, 2), (8, 8, 3), (5, 12, 1)])
def test_closed_form_moments_match_direct_monte_carlo(d_out, d_in, r):
    """E X² and Var X² of X = ‖UᵀWV‖_F, against U, V drawn by QR (an independent sampler) and the full W."""
    W = torch.from_numpy(_weight(d_out, d_in))
    draws = 40000
    x2 = _direct_norms(W, r, draws, seed=5) ** 2
    mean, var = projection_null_moments(np.linalg.svd(W.numpy(), compute_uv=False), d_out, d_in, r)
    assert mean == pytest.approx(r * r * float(torch.sum(W**2)) / (d_out * d_in))
    assert x2.mean() == pytest.approx(mean, abs=5 * x2.std() / np.sqrt(draws))
    # Var of a sample variance ≈ (μ₄ − σ⁴)/n
    se_var = np.sqrt((np.mean((x2 - x2.mean()) ** 4) - x2.var() ** 2) / draws)
    assert x2.var() == pytest.approx(var, abs=5 * se_var)


def test_full_rank_projection_has_no_variance():
    s = np.array([3.0, 2.0, 1.0])
    assert projection_null_moments(s, 3, 3, 3) == pytest.approx((14.0, 0.0))
    assert projection_null_moments(s, 3, 3, 0) == (0.0, 0.0)
    with pytest.raises(LoraAnalysisError):
        projection_null_moments(s, 3, 3, 4)


def test_samples_from_singular_values_have_the_law_of_the_full_weight():
    d_out, d_in, r, draws = 10, 7, 3, 4000
    W = _weight(d_out, d_in, seed=2)
    samples = projection_null_samples(np.linalg.svd(W, compute_uv=False), _frames(d_out, 4, draws, 1),
                                      _frames(d_in, 4, draws, 2), r)
    direct = _direct_norms(torch.from_numpy(W), r, draws, seed=9)
    # two-sample comparison through quantiles (the KS statistic of two samples of 4000)
    grid = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(samples, grid), np.quantile(direct, grid), rtol=0.06)
    mean, _ = projection_null_moments(np.linalg.svd(W, compute_uv=False), d_out, d_in, r)
    assert np.mean(samples**2) == pytest.approx(mean, rel=0.03)


def test_haar_frames_are_orthonormal_seeded_and_uniform():
    frames = _frames(20, 3, 3000, 4)
    gram = frames.mT.double() @ frames.double()
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64).expand_as(gram), atol=1e-6)
    assert torch.equal(frames, _frames(20, 3, 3000, 4))
    assert not torch.equal(frames, _frames(20, 3, 3000, 5))
    # the squared first coordinate of a uniform unit vector is Beta(1/2, (d − 1)/2)
    assert kstest(frames[:, 0, 0].double().numpy() ** 2, phi_column_null(1, 20).cdf).pvalue > 0.001
    # E[Q Qᵀ] = (k/d) I
    projector = (frames.double() @ frames.mT.double()).mean(0)
    assert torch.allclose(projector, 3 / 20 * torch.eye(20, dtype=torch.float64), atol=0.02)


def test_phi_band_is_simultaneous_for_random_subspaces():
    d, draws = 24, 2000
    low, high = phi_null_band(_frames(d, 6, draws, 7), 5, 6, level=0.9)
    assert np.all(low <= high)
    # fresh random pairs, drawn another way, cross the high edge anywhere in ≈ 10 % of grids
    A, B = _other_frames(d, 5, 2000, seed=11), _other_frames(d, 6, 2000, seed=12)
    pairs = phi_grid((A.mT @ B).numpy())  # two independent random subspaces per draw
    assert np.mean(np.any(pairs > high, axis=(1, 2))) == pytest.approx(0.10, abs=0.03)
    assert np.mean(np.any(pairs < low, axis=(1, 2))) == pytest.approx(0.10, abs=0.03)
    # and each cell alone far less often: the band is wider than pointwise quantiles
    assert np.mean(pairs > high) < 0.05
    # the band straddles the chance level max(i, j)/d
    chance = np.maximum(np.arange(1, 6)[:, None], np.arange(1, 7)[None, :]) / d
    assert np.all(low < chance) and np.all(chance < high)
    # φ(d, j) = 1 for every subspace: no spread, the band collapses onto it
    full = phi_null_band(_frames(6, 2, 200, 1), 6, 2)
    np.testing.assert_allclose(full[:, 5, :], [[1 - 1e-3] * 2, [1 + 1e-3] * 2])
    with pytest.raises(LoraAnalysisError):
        phi_null_band(_frames(d, 6, 10, 1), 5, 7)


def test_phi_column_null():
    assert phi_column_null(3, 10).mean() == pytest.approx(0.3)
    with pytest.raises(LoraAnalysisError):
        phi_column_null(10, 10)


@pytest.mark.parametrize("a, b", [(0.5, 191.5), (4.0, 188.0), (32.0, 352.0), (0.5, 0.5), (2.5, 1.5), (0.5, 4095.5)])
def test_beta_law_matches_scipy(a, b):
    law, oracle = BetaLaw(a, b), beta(a, b)
    x = np.linspace(1e-4, 1 - 1e-4, 41)
    np.testing.assert_allclose(law.cdf(x), oracle.cdf(x), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(law.sf(x), oracle.sf(x), rtol=1e-10, atol=1e-300)
    for q in (1e-8, 0.025, 0.5, 0.975):
        assert law.ppf(q) == pytest.approx(oracle.ppf(q), rel=1e-10)
    assert law.mean() == pytest.approx(oracle.mean(), rel=1e-15)
    assert law.cdf(0.0) == 0.0 and law.cdf(1.0) == 1.0
