"""The randomized SVD of dense ΔW (`analysis.dense_svd`) against the float64 LAPACK oracle of the
materialized matrix: every true σᵢ inside its stated interval, over random shapes, ranks, noise
and magnitudes from 1e-300 to 1e300; metrics exact or bracketed; `analyze FT --base --svd
randomized` recovering a planted spectrum; `extract --svd randomized` stating its exact error;
the exact route unchanged on MiniLM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_analysis import LoraAnalysisError
from lora_analysis.adapters import Adapter, DenseModule
from lora_analysis.analysis import RankRule, SvdOptions, dense_svd, module_spectrum, rank_metrics, resize_adapter
from lora_analysis.cli.main import main

PLANTED = [1.0, 0.7, 0.5, 0.3, 0.2]


def low_rank_plus_noise(m: int, n: int, sigmas, noise: float, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ + noise·G, (m, n) float64, U, V random orthonormal, G standard Gaussian."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ V.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def oracle(delta: torch.Tensor) -> tuple[np.ndarray, float]:
    """(σ, ‖·‖_F) of delta at any magnitude: float64 LAPACK on delta·2**-e (largest entry in
    [0.5, 1), an exact scaling), scaled back by 2**e."""
    exponent = math.frexp(float(delta.abs().max()))[1] if delta.abs().max() > 0 else 0
    M = torch.ldexp(delta, torch.tensor(-exponent))
    return np.ldexp(torch.linalg.svdvals(M).numpy(), exponent), math.ldexp(float(torch.linalg.matrix_norm(M)), exponent)


def assert_brackets(spectrum, truth: np.ndarray) -> None:
    """Every true σᵢ in [lower, upper]; those beyond the sketch ≤ residual + rounding — up to the
    oracle's own LAPACK accuracy, max(m, n)·eps·σ₁."""
    lower, upper = (b.numpy() for b in spectrum.bounds())
    k = len(lower)
    slack = max(spectrum.shape) * np.finfo(np.float64).eps * truth[0]
    assert np.all(truth[:k] >= lower - slack) and np.all(truth[:k] <= upper + slack), (truth[:k] - lower, upper - truth[:k])
    if k < len(truth):
        assert truth[k] <= spectrum.residual + spectrum.rounding + slack


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 48), n=st.integers(2, 48), rank=st.integers(0, 8), noise=st.sampled_from([0.0, 1e-12, 1e-6, 1e-2, 1.0]),
       exponent=st.integers(-990, 990), sketch=st.integers(1, 12), power=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_every_true_singular_value_lies_in_its_interval(m, n, rank, noise, exponent, sketch, power, seed):
    sigmas = sorted(np.random.default_rng(seed).uniform(0.01, 1.0, size=min(rank, m, n)).tolist(), reverse=True)
    M = low_rank_plus_noise(m, n, sigmas, noise, seed) if sigmas or noise else torch.zeros(m, n, dtype=torch.float64)
    delta = torch.ldexp(M, torch.tensor(exponent))  # entries from ~1e-300 to ~1e300: exact power-of-two scaling
    if not torch.isfinite(delta).all() or (M.abs().max() > 0 and delta.abs().max() == 0):
        return
    options = SvdOptions(method="randomized", sketch=sketch, power_iterations=power, rtol=0.5)
    try:
        spectrum = module_spectrum(DenseModule(delta=delta, alpha=1.0, divisor=1.0), device="cpu", svd=options)
    except LoraAnalysisError as err:  # refused where float64 cannot hold the spectrum (documented)
        assert "float64" in str(err)
        return
    truth, norm = oracle(delta)
    if spectrum.exact:
        return
    assert_brackets(spectrum, truth)
    assert spectrum.frobenius_norm == pytest.approx(norm, rel=1e-12, abs=0)
    metrics = spectrum.metrics((0.5, 0.9, 0.99))
    tolerance = max(m, n) * np.finfo(np.float64).eps * truth[0]
    exact = rank_metrics(truth, (0.5, 0.9, 0.99), tolerance)
    if metrics.intervals is None:  # resolved: every number as from LAPACK
        assert spectrum.residual <= spectrum.tolerance
        assert metrics.sigma_max == pytest.approx(exact.sigma_max, rel=1e-9)
        return
    low, high = metrics.intervals.sigma_max
    assert low <= truth[0] <= high
    low, high = metrics.intervals.stable_rank
    assert low <= exact.stable_rank * (1 + 1e-9) and (high is None or exact.stable_rank <= high * (1 + 1e-9))
    for tau, (low, high) in metrics.intervals.energy_rank.items():
        assert low <= exact.energy_rank[tau] <= high
        assert metrics.energy_rank[tau] in (None, exact.energy_rank[tau])
    low, high = metrics.intervals.numerical_rank
    assert low <= exact.numerical_rank <= high
    assert metrics.sigma_max is None and metrics.roy_vetterli_rank is None and metrics.energy_effective_rank is None


def test_the_sketch_grows_until_the_bound_meets_the_tolerance_and_auto_falls_back_to_exact():
    M = low_rank_plus_noise(300, 200, [1.0] * 40, 1e-9, seed=3)
    tight = dense_svd(M, SvdOptions(method="randomized", sketch=8, rtol=1e-6))
    assert not tight.exact and tight.sketch >= 40 and tight.residual <= 1e-6 * tight.frobenius
    # a flat noise floor that a quarter of the short side cannot capture: auto decomposes exactly
    flat = low_rank_plus_noise(300, 200, [1.0], 0.1, seed=4)
    assert dense_svd(flat, SvdOptions(method="auto", min_dim=100, sketch=8)).exact
    forced = dense_svd(flat, SvdOptions(method="randomized", sketch=8))
    assert not forced.exact and forced.residual > 0.01 * forced.frobenius  # stated, not met
    assert dense_svd(M, "auto").exact  # below min_dim: LAPACK, as before


def test_the_residual_is_computed_from_E_itself_not_by_cancellation():
    """‖E‖_F far below √eps·‖A‖_F, where ‖A‖² − ‖B‖² would be rounding noise of order eps·‖A‖²."""
    M = low_rank_plus_noise(120, 90, [1.0, 0.5], 1e-13, seed=5)
    result = dense_svd(M, SvdOptions(method="randomized", sketch=4, power_iterations=1))
    E = M - M @ result.V @ result.V.T  # the sketch's residual: (I − QQᵀ)M = M − M V Vᵀ (B = QᵀM = U_B Σ Vᵀ)
    truth = float(torch.linalg.matrix_norm(E))
    assert truth < 1e-9 and result.residual == pytest.approx(truth, rel=1e-6)


def planted_pair(root, shapes, noise: float, seed: int = 0):
    """A base and a fine-tuned HF-style checkpoint whose ΔW per weight is a planted rank-5
    spectrum (PLANTED) plus Gaussian noise, stored in float32 (like a real checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for key, (m, n) in shapes.items():
        W = 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
        base[key] = W.float()
        ft[key] = (W + low_rank_plus_noise(m, n, PLANTED, noise, seed=int(torch.randint(2**30, (1,), generator=g)))).float()
    for name, state in (("base", base), ("ft", ft)):
        (root / name).mkdir(parents=True)
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
    return root / "ft", root / "base"


def materialized(ft, base, key) -> torch.Tensor:
    return load_file(ft / "model.safetensors")[key].double() - load_file(base / "model.safetensors")[key].double()


SHAPES = {"encoder.layer.0.attention.self.query.weight": (520, 300), "encoder.layer.0.output.dense.weight": (300, 520)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return planted_pair(tmp_path_factory.mktemp("planted"), SHAPES, noise=2e-6)


def test_analyze_a_fine_tune_with_the_randomized_svd_recovers_the_planted_spectrum(pair, tmp_path, capsys):
    ft, base = pair
    out = tmp_path / "report.json"
    assert main(["analyze", str(ft), "--base", str(base), "--svd", "randomized", "--format", "json", "-o", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    for name, module in report["modules"].items():
        svd = module["svd"]
        assert svd["method"] == "randomized" and svd["sketch"] < min(module["shape"]) and not svd["resolved"]
        truth = torch.linalg.svdvals(materialized(ft, base, f"{name}.weight")).numpy()
        lower, upper = np.array(svd["singular_value_lower"]), np.array(svd["singular_value_upper"])
        assert np.all(lower <= truth[: len(lower)]) and np.all(truth[: len(upper)] <= upper)
        assert truth[len(lower)] <= svd["residual"]
        np.testing.assert_allclose(module["singular_values"][:5], PLANTED, rtol=1e-3)  # the planted spectrum, ± noise
        assert module["energy_rank"] == {"0.9": 3, "0.99": 5}  # pinned down by the bound: integers, not intervals
        assert module["frobenius_norm"] == pytest.approx(float(np.sqrt((truth**2).sum())), rel=1e-12)
        assert module["sigma_max"] is None and svd["intervals"]["sigma_max"][0] <= truth[0] <= svd["intervals"]["sigma_max"][1]
        assert module["numerical_rank"] is None and module["base"] is None
        pointer = f"/modules/{name}/sigma_max"
        assert "randomized SVD" in report["null_reasons"][pointer]
    assert any("randomized SVD" in note for note in report["notes"])
    assert main(["analyze", str(ft), "--base", str(base), "--svd", "randomized", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "randomized l=" in text and "‖E‖/‖ΔW‖" in text


def test_auto_keeps_small_matrices_exact_and_identical_to_exact(pair, capsys):
    ft, base = pair
    reports = []
    for svd in ("auto", "exact"):
        assert main(["analyze", str(ft), "--base", str(base), "--svd", svd, "--format", "json", "--quiet"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0] == reports[1]
    assert all(m["svd"] == {"method": "exact", "sketch": None, "residual": 0.0, "relative_residual": 0.0, "resolved": True,
                            "singular_value_lower": None, "singular_value_upper": None, "intervals": None}
               for m in reports[0]["modules"].values())


def test_extract_with_the_randomized_svd_states_the_exact_error_of_what_it_writes(pair):
    ft, base = pair
    from lora_analysis.model_pair import ModelPair

    adapter = ModelPair(ft, base).adapter()
    result = resize_adapter(adapter, RankRule("rank", 4), device="cpu", progress=False, svd=SvdOptions(method="randomized", sketch=16))
    for name, cut in result.modules.items():
        module = result.adapter.modules[name]
        written = (module.B.double() @ module.A.double())
        delta = materialized(ft, base, f"{name}.weight")
        truth = torch.linalg.svdvals(delta).numpy()
        optimum = float(np.sqrt((truth[4:] ** 2).sum()))
        assert cut.svd == "randomized" and cut.rank == 4
        assert cut.error == pytest.approx(float(torch.linalg.matrix_norm(delta - written)), rel=1e-5)  # float32 factors
        assert optimum * (1 - 1e-9) <= cut.error <= math.sqrt(optimum**2 + cut.svd_residual**2) * (1 + 1e-6)


def test_energy_rules_beyond_the_sketch_are_refused():
    delta = low_rank_plus_noise(200, 150, [1.0], 0.05, seed=7)
    adapter = Adapter({"m": DenseModule(delta=delta, alpha=1.0, divisor=1.0)})
    with pytest.raises(LoraAnalysisError, match="--svd exact"):
        resize_adapter(adapter, RankRule("energy", 0.999), device="cpu", progress=False,
                       svd=SvdOptions(method="randomized", sketch=8, power_iterations=0))


def test_minilm_stays_on_the_exact_route(tmp_path, capsys):
    """MiniLM's largest weights (30,522 × 384, 1,536 × 384) are below the randomized threshold:
    --svd auto gives the exact report, byte for byte."""
    from lora_analysis.base_weights import model_path

    base = model_path("minilm")
    state = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.weight"):
        state[key] = state[key] + 1e-3 * torch.randn(state[key].shape, generator=g)
    (tmp_path / "ft").mkdir()
    save_file(state, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    outputs = []
    for svd in ("auto", "exact"):
        assert main(["analyze", str(tmp_path / "ft"), "--base", "minilm", "--no-intruders", "--modules", "*word_embeddings*",
                     "--modules", "*layer.0.intermediate*", "--svd", svd, "--format", "json", "--quiet"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert all(m["svd"]["method"] == "exact" for m in json.loads(outputs[0])["modules"].values())


def test_extract_cli_says_which_svd_and_leaves_the_numerical_rank_open(pair, tmp_path, capsys):
    ft, base = pair
    assert main(["extract", str(ft), "--base", str(base), "--rank", "4", "--svd", "randomized", "--modules", "*",
                 "-o", str(tmp_path / "out"), "--format", "json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)["modules"]
    assert rows and all(r["svd"] == "randomized" and r["svd_residual"] > 0 and r["numerical_rank"] is None and r["rank"] == 4
                        for r in rows)
