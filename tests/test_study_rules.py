"""The study's verdict rules on synthetic inputs whose answer is known (questions 1-3), its
closed-form null (Marchenko–Pastur) against draws, its grid and its output rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lora_analysis.analysis.spectrum import rank_metrics
from lora_analysis.analysis.stats import sign_test
from lora_analysis.errors import LoraAnalysisError
from lora_analysis.study import StudyConfig
from lora_analysis.study.config import FULL_GRID, QUICK_GRID
from lora_analysis.study.deltas import DeltaSVD, projection_of, target_projection
from lora_analysis.study.full_ft_spectrum import MarchenkoPastur, Unit, unit_numbers
from lora_analysis.study.full_ft_spectrum import verdicts as spectrum_verdicts
from lora_analysis.study.lora_vs_full import null_statistic, pair_units, top_phi
from lora_analysis.study.lora_vs_full import verdict as phi_verdict
from lora_analysis.study.questions import QUESTIONS
from lora_analysis.study.render import check_output_dir, output_files, study_record
from lora_analysis.study.runs import sweep_plans
from lora_analysis.study.verdicts import INCONCLUSIVE, TRIVIAL, sign_verdict, spearman_rows, trend_test


def _orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


# Question 1: the closed-form null and the rules ---------------------------------------------
@pytest.mark.parametrize("shape", [(120, 120), (240, 80), (80, 240)])
def test_marchenko_pastur_matches_gaussian_draws(shape):
    rng = np.random.default_rng(0)
    law = MarchenkoPastur(*shape)
    n = min(shape)
    draws = [np.linalg.svd(rng.standard_normal(shape), compute_uv=False) for _ in range(20)]
    for tau in (0.5, 0.9, 0.99):
        fractions = [rank_metrics(s, (tau,)).energy_rank[tau] / n for s in draws]
        # the discrete energy rank sits within one unit (1/n) of the continuum fraction
        assert abs(np.mean(fractions) - law.energy_rank_fraction(tau)) < 1.5 / n
    normalized = np.mean([s / np.linalg.norm(s) for s in draws], axis=0)
    assert np.max(np.abs(normalized - law.normalized_spectrum())) < 0.1 * law.edge
    assert law.edge == pytest.approx(1 / math.sqrt(shape[0]) + 1 / math.sqrt(shape[1]))
    assert np.max(normalized) == pytest.approx(law.edge, rel=0.08)


def test_marchenko_pastur_limits():
    law = MarchenkoPastur(100, 100)
    assert law.energy_rank_fraction(1.0) == pytest.approx(1.0)
    assert law.energy_rank_fraction(0.0) == pytest.approx(0.0)
    assert np.sum(law.normalized_spectrum() ** 2) == pytest.approx(1.0, rel=0.01)  # equal norm


def _units(matrices: list[np.ndarray]) -> list[dict]:
    units = []
    for layer, M in enumerate(matrices):
        S = np.linalg.svd(M, compute_uv=False)
        norm = float(np.linalg.norm(S))
        units.append(unit_numbers(Unit(0, "query", layer, M.shape, S / norm, norm), max_rank=8))
    return units


def test_planted_low_rank_update_holds_and_random_does_not():
    rng = np.random.default_rng(1)
    d, planted = 96, 4
    low = [_orthonormal(rng, d, planted) @ np.diag([8.0, 6.0, 4.0, 3.0]) @ _orthonormal(rng, d, planted).T
           + 0.01 * rng.standard_normal((d, d)) for _ in range(12)]
    found = spectrum_verdicts(_units(low), max_rank=8)
    assert [v.verdict for v in found] == ["holds", "holds", "holds"]
    random = [rng.standard_normal((d, d)) for _ in range(12)]
    found = spectrum_verdicts(_units(random), max_rank=8)
    assert found[0].verdict in ("does not hold", INCONCLUSIVE)
    assert found[1].verdict in ("does not hold", INCONCLUSIVE)
    assert found[2].verdict == "does not hold"
    assert "sign test" in found[0].rule and "Marchenko" in found[0].rule


def test_random_matrices_sit_at_the_null_ratio():
    rng = np.random.default_rng(2)
    units = _units([rng.standard_normal((120, 60)) for _ in range(8)])
    for u in units:
        assert u["ratio_90"] == pytest.approx(1.0, abs=3 / 60)
        assert 0 <= u["above_edge"] <= 2


# Question 2: LoRA sharing planted directions ------------------------------------------------
def _svd(name: str, layer: int, M: np.ndarray, k: int = 8) -> DeltaSVD:
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return DeltaSVD(name, "query", layer, M.shape, S, U[:, :k], Vt[:k].T)


def test_null_statistic_has_the_chance_mean():
    d, k = 64, 8
    null = null_statistic(d, k, 2000)
    # E φ(i, i) = i/d for random subspaces: the mean over i ≤ k is (k + 1)/(2d)
    assert np.mean(null) == pytest.approx((k + 1) / (2 * d), rel=0.05)


def test_top_phi_matches_principal_angles():
    rng = np.random.default_rng(3)
    a, b = _orthonormal(rng, 40, 5), _orthonormal(rng, 40, 5)
    mean, phi11 = top_phi(a, b, 5)
    assert phi11 == pytest.approx(float(a[:, 0] @ b[:, 0]) ** 2)
    expected = np.mean([np.linalg.norm(a[:, :i].T @ b[:, :i]) ** 2 / i for i in range(1, 6)])
    assert mean == pytest.approx(expected)


def test_shared_directions_hold_and_independent_ones_do_not():
    rng = np.random.default_rng(4)
    d, r = 64, 8
    shared, independent, full = {}, {}, {}
    for layer in range(6):
        U, V = _orthonormal(rng, d, r), _orthonormal(rng, d, r)
        S = np.diag(np.linspace(4, 1, r))
        full[("query", layer)] = _svd("f", layer, U @ S @ V.T + 0.01 * rng.standard_normal((d, d)))
        shared[("query", layer)] = _svd("l", layer, U @ S[::-1, ::-1] @ V.T + 0.05 * rng.standard_normal((d, d)))
        independent[("query", layer)] = _svd("l", layer, rng.standard_normal((d, r)) @ rng.standard_normal((r, d)))
    nulls = {(d, r): null_statistic(d, r, 500)}
    units = pair_units(shared, full, ["query"], r, 0, 0) + pair_units(shared, full, ["query"], r, 1, 1)
    assert all(phi_verdict(units, space, nulls, r).verdict == "holds" for space in ("output", "input"))
    units = pair_units(independent, full, ["query"], r, 0, 0) + pair_units(independent, full, ["query"], r, 1, 1)
    assert all(phi_verdict(units, space, nulls, r).verdict != "holds" for space in ("output", "input"))


# Question 3: trends over layers -------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=1, max_size=4))
def test_spearman_rows_matches_scipy(rows):
    values = np.array(rows, dtype=float)
    for row, rho in zip(values, spearman_rows(values)):
        expected = 0.0 if np.all(row == row[0]) else stats.spearmanr(np.arange(6), row).statistic
        assert rho == pytest.approx(expected, abs=1e-12)


def test_planted_depth_trend_holds_and_no_trend_is_inconclusive():
    rng = np.random.default_rng(5)
    layers = np.arange(6)
    increasing = 10 + 5 * layers + rng.normal(0, 2, size=(6, 6))
    assert trend_test(increasing).verdict == "holds"
    assert trend_test(-increasing).verdict == "does not hold"
    flat = rng.normal(0, 1, size=(6, 6))
    test = trend_test(flat)
    assert test.verdict == "inconclusive" and test.p_value >= 0.05
    one_weak_unit = layers + rng.normal(0, 4, size=(1, 6))
    assert trend_test(one_weak_unit).verdict == "inconclusive"  # 6 layers cannot decide a weak trend


def test_trend_test_is_calibrated_under_the_null():
    rng = np.random.default_rng(6)
    rejections = sum(trend_test(rng.normal(size=(3, 6)), seed=i, permutations=400).p_value < 0.05 for i in range(200))
    assert rejections <= 22  # 5 % of 200 = 10; Binomial(200, 0.05) exceeds 22 with probability < 1e-3


def test_trend_test_refuses_bad_input():
    with pytest.raises(LoraAnalysisError):
        trend_test([[1.0, 2.0]])
    with pytest.raises(LoraAnalysisError):
        trend_test([[1.0, float("nan"), 2.0]])


# Verdict wording ------------------------------------------------------------------------------
def test_sign_verdict_says_trivial_when_the_null_passes():
    test = sign_test([2.0] * 10, 1.0, "greater")
    assert sign_verdict(test, [0.5] * 10, "x", "null").verdict == "holds"
    assert sign_verdict(test, [1.0] * 10, "x", "null").verdict == TRIVIAL
    assert sign_verdict(sign_test([1.5, 0.5] * 5, 1.0, "greater"), [0.5] * 10, "x", "null").verdict == INCONCLUSIVE


# Names, grid, outputs -------------------------------------------------------------------------
def test_projection_names():
    assert projection_of("bert.encoder.layer.3.attention.self.query") == "query"
    assert projection_of("bert.encoder.layer.3.attention.output.dense") == "attention.output"
    assert projection_of("bert.encoder.layer.3.output.dense") == "output"
    assert projection_of("bert.encoder.layer.3.intermediate.dense") == "intermediate"
    assert projection_of("bert.pooler.dense") is None
    assert target_projection("value") == "value" and target_projection("attention.output.dense") == "attention.output"
    with pytest.raises(LoraAnalysisError):
        target_projection("lm_head")


def test_quick_and_full_grids():
    full, quick = StudyConfig(), StudyConfig(quick=True)
    assert {k: getattr(full, k) for k in FULL_GRID} == FULL_GRID
    assert {k: getattr(quick, k) for k in QUICK_GRID} == QUICK_GRID
    assert StudyConfig(quick=True, seeds=(0, 1, 2)).seeds == (0, 1, 2)  # given values are kept
    assert quick.reproduce_config("trec").train_config().steps == 4
    assert StudyConfig().reproduce_config("trec").train_config() == StudyConfig().reproduce_config("trec").train_config()


def test_sweep_plans_cover_the_grid_once():
    config = StudyConfig()
    main = sweep_plans(config, "rotten_tomatoes")
    other = sweep_plans(config, "trec")
    assert len(other) == 1 and other[0].ranks == (1, 2, 4, 8, 64) and other[0].full
    stability = main[1]
    assert stability.seeds == (3, 4) and stability.ranks == (8,) and stability.full
    targets = [p.target_sets[0] for p in main[2:]]
    assert targets == [["query", "key", "value", "attention.output.dense"], "all-linear"]  # {q, v} r = 8 is in the grid


def test_output_dir_rules(tmp_path):
    record = study_record(StudyConfig())
    check_output_dir(tmp_path / "new", record, QUESTIONS)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("mine")
    with pytest.raises(LoraAnalysisError, match="not the output of a previous study"):
        check_output_dir(foreign, record, QUESTIONS)
    check_output_dir(foreign, record, QUESTIONS, force=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "results.json").write_text(json.dumps({"format": "lora_analysis.study/1", "study": record}))
    check_output_dir(full, record, QUESTIONS)
    with pytest.raises(LoraAnalysisError, match="a --quick run would replace"):
        check_output_dir(full, study_record(StudyConfig(quick=True)), QUESTIONS)
    with pytest.raises(LoraAnalysisError, match="tasks"):
        check_output_dir(full, study_record(StudyConfig(tasks=("trec",))), QUESTIONS)
    assert "full_ft_spectrum.pdf" in output_files(QUESTIONS)
