"""φ grids against the naive loop of norms, closed forms and the random-subspace distribution."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from lora_analysis import Adapter, LoraModule
from lora_analysis.analysis import (
    adapter_spectra,
    chance_level,
    compare_adapters,
    compare_layers,
    compare_modules,
    module_spectrum,
    principal_angles,
    random_basis,
    random_reference_grid,
    seeded_generator,
    subspace_similarity,
)
from lora_analysis.errors import LoraAnalysisError


def orthonormal(d, k, seed):
    return random_basis(d, k, seeded_generator(seed))


def naive_phi(U1, U2, i, j):
    """Paper Eq. 4, one (i, j) at a time."""
    return float(torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))


def lora(d_out, d_in, r, seed, alpha=None) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g), alpha=alpha or r)


def test_grid_equals_naive_loop_of_norms():
    U1, U2 = orthonormal(30, 5, 0), orthonormal(30, 7, 1)
    grid = subspace_similarity(U1, U2)
    assert grid.shape == (5, 7)
    expected = np.array([[naive_phi(U1, U2, i, j) for j in range(1, 8)] for i in range(1, 6)])
    np.testing.assert_allclose(grid, expected, rtol=1e-12, atol=1e-14)


def test_phi_range_identity_and_symmetry():
    U1, U2 = orthonormal(40, 8, 2), orthonormal(40, 6, 3)
    grid = subspace_similarity(U1, U2)
    assert np.all((grid >= 0) & (grid <= 1))
    np.testing.assert_allclose(subspace_similarity(U2, U1), grid.T, rtol=1e-12, atol=1e-15)
    self_grid = subspace_similarity(U1, U1)
    np.testing.assert_allclose(np.diagonal(self_grid), 1.0, rtol=1e-12)
    # φ(X, X, i, j) = 1 whenever one top space contains the other (i ≤ j or j ≤ i).
    np.testing.assert_allclose(self_grid, 1.0, rtol=1e-12)
    # Also from numpy and float32 input.
    np.testing.assert_allclose(subspace_similarity(U1.numpy(), U2.float()), grid, atol=1e-6)


def test_random_subspaces_match_chance_level():
    """E[φ(i, j)] = max(i, j)/d; checked within 5 standard errors of the mean over 300 draws."""
    d, k, draws = 48, 6, 300
    grids = np.stack([subspace_similarity(orthonormal(d, k, 2 * s), orthonormal(d, k, 2 * s + 1)) for s in range(draws)])
    mean, se = grids.mean(0), grids.std(0, ddof=1) / np.sqrt(draws)
    assert np.all(np.abs(mean - chance_level(k, k, d)) < 5 * se)
    # For i = 1 the distribution is known exactly: φ(1, j) ~ Beta(j/2, (d - j)/2).
    for j in (1, 3, 6):
        p = scipy.stats.kstest(grids[:, 0, j - 1], scipy.stats.beta(j / 2, (d - j) / 2).cdf).pvalue
        assert p > 1e-3


def test_chance_level_and_reference_grid():
    np.testing.assert_allclose(chance_level(2, 3, 10), [[0.1, 0.2, 0.3], [0.2, 0.2, 0.3]])
    reference = random_reference_grid(512, 64, 64, seed=7)
    assert reference.shape == (64, 64)
    np.testing.assert_array_equal(reference, random_reference_grid(512, 64, 64, seed=7))
    assert not np.array_equal(reference, random_reference_grid(512, 64, 64, seed=8))
    # Averaged over the grid, one draw sits at chance (small spread for d = 512, k = 64).
    assert abs(reference[8:, 8:].mean() - chance_level(64, 64, 512)[8:, 8:].mean()) < 0.01


def test_ranks_mask_grid_and_principal_angles_agree():
    U1, U2 = orthonormal(20, 6, 4), orthonormal(20, 5, 5)
    grid = subspace_similarity(U1, U2, rank1=4, rank2=3)
    assert np.isnan(grid[4:, :]).all() and np.isnan(grid[:, 3:]).all()
    assert not np.isnan(grid[:4, :3]).any()
    angles = principal_angles(U1[:, :4], U2[:, :3])
    assert angles.shape == (3,) and np.all(np.diff(angles) >= 0)
    # Σ cos²θ = ‖U1ᵀU2‖²_F = min(i, j)·φ(i, j)
    assert np.sum(np.cos(angles) ** 2) == pytest.approx(3 * grid[3, 2], rel=1e-10)


def test_rank_deficient_module_masks_dw_basis():
    m = lora(16, 12, 4, 0)
    m.B[:, 2:] = 0  # rank-2 ΔW
    spec = module_spectrum(m, device="cpu")
    comparison = compare_modules(spec, spec, basis="dW-left")
    assert (comparison.rank_a, comparison.rank_b) == (2, 2)
    assert np.isnan(comparison.grid[2:, :]).all()
    assert comparison.phi_11 == pytest.approx(1.0) and comparison.top_k == 2
    assert np.allclose(comparison.principal_angles, 0.0, atol=1e-3)
    assert compare_modules(spec, spec, basis="A").rank_a == 4  # A itself has full rank


def test_nested_ranks_share_the_low_rank_subspace():
    """An r=8 A whose rows lie in the span of an r=64 A: φ(8, 64) = 1 (paper Fig. 3 setting)."""
    g = torch.Generator().manual_seed(0)
    A64 = torch.randn(64, 256, generator=g)
    A8 = torch.randn(8, 64, generator=g) @ A64
    small = module_spectrum(LoraModule(A=A8, B=torch.randn(32, 8, generator=g), alpha=8), device="cpu")
    large = module_spectrum(LoraModule(A=A64, B=torch.randn(32, 64, generator=g), alpha=64), device="cpu")
    c = compare_modules(small, large, basis="A")
    assert c.grid.shape == (8, 64) and c.dim == 256
    assert c.phi(8, 64) == pytest.approx(1.0, abs=1e-5)
    assert c.chance.shape == (8, 64) and c.chance[7, 63] == pytest.approx(64 / 256)


def test_compare_adapters_matches_names_and_lists_unmatched():
    a = Adapter({"encoder.layer.0.q": lora(16, 16, 4, 0), "encoder.layer.0.v": lora(16, 16, 4, 1), "head": lora(4, 16, 2, 2)})
    b = Adapter({"bert.encoder.layer.0.q": a["encoder.layer.0.q"], "encoder.layer.0.v": lora(16, 16, 8, 3), "other": lora(8, 8, 2, 4)})
    result = compare_adapters(a, b)
    assert list(result.modules) == ["encoder.layer.0.q", "encoder.layer.0.v"]
    assert result.matched["encoder.layer.0.q"] == "bert.encoder.layer.0.q"
    assert result.only_in_a == ["head"] and result.only_in_b == ["other"]
    same = result.modules["encoder.layer.0.q"]
    assert same.phi_11 == pytest.approx(1.0) and same.top_k_mean == pytest.approx(1.0)
    different = result.modules["encoder.layer.0.v"]
    assert different.grid.shape == (4, 8) and 0 <= different.phi_11 <= 1
    # Spectra dicts work as well as adapters, and so does every basis.
    for basis in ("A", "B", "dW-left", "dW-right"):
        from_spectra = compare_adapters(adapter_spectra(a, progress=False), adapter_spectra(b, progress=False), basis=basis)
        assert from_spectra.modules["encoder.layer.0.q"].phi(1, 1) == pytest.approx(1.0)


def test_compare_adapters_rejects_mismatched_dimensions():
    a = Adapter({"x.q": lora(16, 16, 4, 0)})
    b = Adapter({"x.q": lora(16, 24, 4, 1)})
    with pytest.raises(LoraAnalysisError, match="x.q"):
        compare_adapters(a, b, basis="A")


def test_compare_layers_groups_by_layer_index():
    modules = {f"encoder.layer.{i}.attention.{kind}": lora(16, 16, 4, 10 * i + j) for i in range(3) for j, kind in enumerate("qv")}
    modules["encoder.layer.1.attention.v"] = modules["encoder.layer.0.attention.v"]  # identical layers 0 and 1
    modules["pooler.dense"] = lora(16, 16, 4, 99)
    layers = compare_layers(Adapter(modules), basis="A", top_k=2)
    assert set(layers) == {"encoder.layer.*.attention.q", "encoder.layer.*.attention.v"}
    v = layers["encoder.layer.*.attention.v"]
    assert v.layers == [0, 1, 2] and v.names[0] == "encoder.layer.0.attention.v"
    np.testing.assert_allclose(np.diagonal(v.phi_11), 1.0)
    np.testing.assert_allclose(v.phi_11, v.phi_11.T)
    assert v.top_k_mean[0, 1] == pytest.approx(1.0)
    expected = compare_modules(
        module_spectrum(modules["encoder.layer.0.attention.v"]), module_spectrum(modules["encoder.layer.2.attention.v"]), top_k=2
    )
    assert v.top_k_mean[0, 2] == pytest.approx(expected.top_k_mean)


def test_shape_errors():
    with pytest.raises(LoraAnalysisError, match="one space"):
        subspace_similarity(orthonormal(10, 2, 0), orthonormal(11, 2, 1))
