"""ΔW against W: W's SVD (exact, randomized, cached), Table 7 identities, Figure 8 φ, intruders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_analysis import BaseWeights, LoraConfig, LoraModule, extract_adapter, inject_lora
from lora_analysis.analysis import (
    AnalysisOptions,
    analyze_adapter,
    default_cache_dir,
    intruder_dimensions,
    module_spectrum,
    phi_vs_weight,
    projection_norms,
    random_basis,
    seeded_generator,
    weight_svd,
)
from lora_analysis.analysis import projection as projection_module
from lora_analysis.errors import LoraAnalysisError
from lora_test_utils import randomize_lora


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_CACHE", str(tmp_path / "cache"))


def weight_with_spectrum(d_out, d_in, singular_values, seed=0):
    """W = U diag(σ) Vᵀ with Haar-random U, V; returns (W float64, U, σ, V)."""
    g = seeded_generator(seed)
    k = len(singular_values)
    U, V = random_basis(d_out, k, g), random_basis(d_in, k, g)
    S = torch.as_tensor(singular_values, dtype=torch.float64)
    return (U * S) @ V.T, U, S, V


def module_from(B, A, alpha=None) -> LoraModule:
    r = A.shape[0]
    return LoraModule(A=A.float(), B=B.float(), alpha=alpha or r)


def projector(U):
    U = U.double()
    return U @ U.T


def test_exact_weight_svd_matches_lapack():
    W = torch.randn(30, 20, generator=seeded_generator(0))
    full = weight_svd(W, cache=False)
    assert full.exact and full.k == 20 and full.max_residual == 0
    torch.testing.assert_close(full.S, torch.linalg.svdvals(W.double()))
    top = weight_svd(W, 5, cache=False)
    assert top.k == 5 and top.U.shape == (30, 5) and top.V.shape == (20, 5)
    torch.testing.assert_close(projector(top.U), projector(torch.linalg.svd(W.double())[0][:, :5]), atol=1e-5, rtol=0)


def test_randomized_weight_svd_accuracy_is_stated_and_holds():
    sigma = 10.0 * 0.8 ** np.arange(120)  # decaying spectrum, like pretrained weights
    W64, U, S, V = weight_with_spectrum(160, 120, sigma)
    W = W64.float()
    k = 8
    approx = weight_svd(W, k, exact_max_dim=0, cache=False)
    assert not approx.exact and approx.k == k
    # Stated accuracy: each σᵢ within residuals[i]·σ₁ of the true one (plus float32 rounding).
    error = (approx.S - S[:k]).abs()
    assert torch.all(error <= approx.residuals * S[0] + 1e-5 * S[0])
    assert approx.max_residual < 1e-4
    torch.testing.assert_close(projector(approx.U), projector(U[:, :k]), atol=1e-4, rtol=0)
    torch.testing.assert_close(projector(approx.V), projector(V[:, :k]), atol=1e-4, rtol=0)
    with pytest.raises(LoraAnalysisError, match="oversample"):
        weight_svd(W, k, exact_max_dim=0, oversample=k, cache=False)


def test_weight_spectrum_top_is_a_compact_copy():
    """top(k) of a full SVD must not keep the (d, d) factors alive through views: with
    --intruders that was 134 MB per 4096² module held for the whole report."""
    full = weight_svd(torch.randn(64, 48, generator=seeded_generator(3)), cache=False)
    top = full.top(5)
    for name in ("U", "S", "V", "residuals"):
        tensor, whole = getattr(top, name), getattr(full, name)
        assert tensor.is_contiguous(), name
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        assert tensor.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr(), name
        torch.testing.assert_close(tensor, whole[:, :5] if tensor.ndim == 2 else whole[:5], rtol=0, atol=0)


def test_weight_svd_cache_hit_miss_and_corruption(tmp_path, monkeypatch):
    W = torch.randn(24, 16, generator=seeded_generator(1))
    first = weight_svd(W, 4, cache_dir=tmp_path)
    files = list((tmp_path / "weight_svd").glob("*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(projection_module, "_exact_svd", lambda W: pytest.fail("cache miss"))
    again = weight_svd(W.clone(), 6, cache_dir=tmp_path)  # exact: one entry serves every k
    torch.testing.assert_close(again.top(4).U, first.U)
    torch.testing.assert_close(again.S[:4], first.S)
    with pytest.raises(pytest.fail.Exception, match="cache miss"):
        weight_svd(W + 1e-3, 4, cache_dir=tmp_path)  # other content, other key
    monkeypatch.undo()
    files[0].write_bytes(b"garbage")
    recomputed = weight_svd(W, 4, cache_dir=tmp_path)
    torch.testing.assert_close(recomputed.S, first.S)
    assert files[0].stat().st_size > 100  # rewritten


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LORA_ANALYSIS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lora_analysis"
    W = torch.randn(8, 6, generator=seeded_generator(2))
    weight_svd(W)
    assert len(list((tmp_path / "xdg" / "lora_analysis" / "weight_svd").iterdir())) == 1


def test_table7_identity_with_w_directions():
    W64, _, S, _ = weight_with_spectrum(40, 30, np.linspace(5.0, 0.5, 30))
    W = W64.float()
    m = module_from(torch.randn(40, 4, generator=seeded_generator(2)), torch.randn(4, 30, generator=seeded_generator(3)))
    norms = projection_norms(module_spectrum(m), W, weight_spectrum=weight_svd(W))
    assert norms.r == 4
    assert norms.weight == pytest.approx(math.sqrt(float((S[:4] ** 2).sum())), rel=1e-5)
    assert norms.weight_norm == pytest.approx(float(torch.linalg.matrix_norm(W64)), rel=1e-6)


def test_table7_delta_projection_and_amplification_against_materialized_svd():
    g = seeded_generator(4)
    W = torch.randn(36, 28, generator=g)
    m = module_from(torch.randn(36, 3, generator=g), torch.randn(3, 28, generator=g), alpha=6)
    norms = projection_norms(module_spectrum(m), W)
    dW = m.scale * (m.B.double() @ m.A.double())
    U, S, Vh = torch.linalg.svd(dW)
    expected = float(torch.linalg.matrix_norm(U[:, :3].T @ W.double() @ Vh[:3].T))
    assert norms.delta == pytest.approx(expected, rel=1e-5)
    assert norms.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(dW)), rel=1e-6)
    assert norms.amplification == pytest.approx(norms.delta_norm / expected, rel=1e-5)


def test_table7_random_directions_match_expectation():
    """E‖UᵀWV‖²_F = r²‖W‖²_F/(d_out·d_in) for independent random U, V; within 5 standard errors."""
    W = torch.randn(50, 40, generator=seeded_generator(5)) * torch.linspace(3, 0.1, 40)
    spec = module_spectrum(module_from(torch.randn(50, 4, generator=seeded_generator(6)), torch.randn(4, 40, generator=seeded_generator(7))))
    ws = weight_svd(W, cache=False)
    draws = np.array([projection_norms(spec, W, seed=s, weight_spectrum=ws).random for s in range(200)])
    expected = projection_norms(spec, W, weight_spectrum=ws).random_expected
    assert expected == pytest.approx(4 * float(torch.linalg.matrix_norm(W)) / math.sqrt(50 * 40))
    squares = draws**2
    assert abs(squares.mean() - expected**2) < 5 * squares.std(ddof=1) / math.sqrt(len(draws))


def test_amplification_is_large_for_directions_w_does_not_emphasize():
    W64, U, S, V = weight_with_spectrum(32, 32, 10.0 * 0.7 ** np.arange(32))
    W = W64.float()
    ws = weight_svd(W)
    along_top = projection_norms(module_spectrum(module_from(U[:, :2] * 3, V[:, :2].T)), W, weight_spectrum=ws)
    along_bottom = projection_norms(module_spectrum(module_from(U[:, -2:] * 3, V[:, -2:].T)), W, weight_spectrum=ws)
    assert along_top.delta == pytest.approx(along_top.weight, rel=1e-4)  # same subspaces as W's top-2
    assert along_bottom.delta == pytest.approx(math.sqrt(float((S[-2:] ** 2).sum())), rel=1e-3)
    assert along_bottom.amplification > 1000 * along_top.amplification


def test_phi_vs_weight_finds_w_subspace():
    W64, U, _, _ = weight_with_spectrum(48, 40, np.linspace(4.0, 1.0, 40))
    W = W64.float()
    B = U[:, :3] @ torch.randn(3, 4, generator=seeded_generator(8), dtype=torch.float64)  # rank-3 ΔW inside W's top-3
    spec = module_spectrum(module_from(B, torch.randn(4, 40, generator=seeded_generator(9), dtype=torch.float64)))
    grid = phi_vs_weight(spec, weight_svd(W, 8))
    assert grid.shape == (8, 4)
    assert grid[2, 2] == pytest.approx(1.0, abs=1e-5)  # φ(3, 3): same 3-dim subspace
    assert grid[7, 2] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(grid[:, 3]).all()  # beyond ΔW's numerical rank


@pytest.mark.parametrize("exact_max_dim", [1536, 0], ids=["exact", "implicit-randomized"])
def test_intruder_dimensions_against_materialized_svd(exact_max_dim):
    d = 64
    W64, U, S, V = weight_with_spectrum(d, d, 10.0 * 0.93 ** np.arange(d))
    W = W64.float()
    # A strong update along a direction spread evenly over W's basis: |cos| = 1/8 with every uᵢ.
    spread = U @ torch.full((d, 1), 1 / math.sqrt(d), dtype=torch.float64)
    m = module_from(40 * spread, V[:, -1:].T)  # input direction W barely uses
    result = intruder_dimensions(module_spectrum(m), W, k=10, exact_max_dim=exact_max_dim)
    tuned = W64 + m.scale * (m.B.double() @ m.A.double())
    Y = torch.linalg.svd(tuned)[0][:, :10]
    expected = (U.T @ Y).abs().amax(0).numpy()
    np.testing.assert_allclose(result.max_cos, expected, atol=1e-4)
    np.testing.assert_allclose(result.singular_values, torch.linalg.svdvals(tuned)[:10].numpy(), rtol=1e-5)
    assert result.is_intruder[0] and result.max_cos[0] < 0.2
    assert result.count == int((expected < 0.5).sum())
    assert result.exact == (exact_max_dim > 0)
    assert result.max_residual < 1e-4
    with pytest.raises(LoraAnalysisError, match="full thin SVD"):
        intruder_dimensions(module_spectrum(m), W, weight_spectrum=weight_svd(W, 5))


def test_analyze_adapter_with_base_weights(tiny_bert):
    model = inject_lora(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), seed=0)
    randomize_lora(model, seed=0)
    adapter = extract_adapter(model)
    base = BaseWeights(model)
    analysis = analyze_adapter(adapter, base, AnalysisOptions(device="cpu"), progress=False)
    assert list(analysis.modules) == list(adapter.modules) and not analysis.notes
    for name, result in analysis.modules.items():
        W = base.weight(name).double()
        S_W = torch.linalg.svdvals(W)
        assert result.projection.weight == pytest.approx(math.sqrt(float((S_W[:4] ** 2).sum())), rel=1e-5)
        assert result.phi_vs_weight.shape == (32, 4)  # W's top-min(64, 32) vs ΔW's top-4
        assert result.intruders.k == 10 and result.intruders.exact
        tuned = torch.linalg.svd(W + adapter[name].delta_weight(torch.float64))[0][:, :10]
        expected = (torch.linalg.svd(W)[0].T @ tuned).abs().amax(0).numpy()
        np.testing.assert_allclose(result.intruders.max_cos, expected, atol=1e-4)
    skipped = analyze_adapter(adapter, base, AnalysisOptions(device="cpu", exact_max_dim=16), progress=False)
    assert all(r.intruders is None and r.projection is not None for r in skipped)
    assert "intruder dimensions skipped for 4 module(s)" in skipped.notes[0]


def test_analyze_progress_counts_modules_when_their_analysis_is_done(tiny_bert, monkeypatch):
    """The bar advances after a module's analysis (W read, compared), not when its factors
    enter a batch: with 4 equal-shape modules (one batch), the old bar read 4/4 before the
    first W was even read."""
    from lora_analysis.analysis import spectrum as spectrum_module

    events: list[tuple[str, object]] = []

    class RecordingBar:
        def __init__(self, total, desc, unit, disable):
            self.n = 0
            events.append(("total", total))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(("closed", self.n))

        def update(self, n=1):
            self.n += n
            events.append(("done", self.n))

    model = inject_lora(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), seed=0)
    randomize_lora(model, seed=0)
    adapter = extract_adapter(model)
    base = BaseWeights(model)
    read = base.weight
    monkeypatch.setattr(base, "weight", lambda name, module=None: (events.append(("read W", name)), read(name, module))[1])
    monkeypatch.setattr(spectrum_module, "tqdm", RecordingBar)
    analyze_adapter(adapter, base, AnalysisOptions(device="cpu", cache=False), progress=True)
    names = list(adapter.modules)
    expected = [("total", 4)]
    for i, name in enumerate(names, start=1):
        expected += [("read W", name), ("done", i)]
    assert events == expected + [("closed", 4)]


@pytest.mark.integration
def test_minilm_projection_against_real_weights():
    from lora_analysis.assets import asset_path

    base = BaseWeights(asset_path("minilm"))
    name = "bert.encoder.layer.3.attention.self.query"
    W = base.weight(name)
    g = seeded_generator(0)
    m = LoraModule(A=torch.randn(8, 384, generator=g) / 20, B=torch.randn(384, 8, generator=g) / 20, alpha=16)
    norms = projection_norms(module_spectrum(m), W, weight_spectrum=weight_svd(W))
    S_W = torch.linalg.svdvals(W.double())
    assert norms.weight == pytest.approx(math.sqrt(float((S_W[:8] ** 2).sum())), rel=1e-5)
    assert norms.weight > norms.delta  # a random ΔW does not align with W's top directions
