"""The verdict machinery: exact sign test, order-statistic interval, rule pass rate under a null."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, binomtest

from lora_analysis.analysis.stats import (
    binomial_half_cdf,
    combine_verdicts,
    mean_interval,
    median_interval,
    order_statistic_rank,
    poisson_binomial_pmf,
    rule_pass_rate,
    sign_test,
)
from lora_analysis.errors import LoraAnalysisError


def test_all_units_above_the_threshold_hold():
    values = np.linspace(0.6, 0.95, 12)
    t = sign_test(values, 0.5, "greater")
    assert (t.n, t.claim_side, t.other_side) == (12, 12, 0)
    assert t.p_value == pytest.approx(2 / 4096)
    # n = 12: k = 3 (2·P(Bin ≤ 2) = 158/4096 ≤ 0.05 < 2·P(Bin ≤ 3)), interval [x_(3), x_(10)]
    assert (t.ci_low, t.ci_high) == (pytest.approx(values[2]), pytest.approx(values[9]))
    assert t.ci_coverage == pytest.approx(1 - 2 * 79 / 4096)
    assert t.verdict == "holds"
    assert sign_test(values, 0.5, "less").verdict == "does not hold"


def test_values_straddling_the_reference_are_inconclusive():
    values = [0.2, 0.3, 0.45, 0.55, 0.6, 0.7, 0.4, 0.52, 0.48, 0.9, 0.1, 0.65]
    t = sign_test(values, 0.5, "greater")
    assert (t.claim_side, t.other_side) == (6, 6) and t.p_value == 1.0
    assert t.verdict == "inconclusive" and t.ci_low < 0.5 < t.ci_high


def test_ties_are_dropped_and_tiny_samples_never_hold():
    t = sign_test([1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 1.0, "greater")
    assert t.n == 6 and t.claim_side == 6 and t.p_value == pytest.approx(2 / 64)
    # n ≤ 5: the smallest two-sided p is 2/32 > 0.05, so no verdict can be reached
    small = sign_test([2.0, 3.0, 4.0, 5.0, 6.0], 0.0, "greater")
    assert small.verdict == "inconclusive" and small.p_value == pytest.approx(2 / 32)
    assert (small.ci_low, small.ci_high, small.ci_coverage) == (-np.inf, np.inf, 1.0)


def test_p_value_matches_scipy_binomtest():
    rng = np.random.default_rng(3)
    for n in (6, 7, 12, 25):
        values = rng.normal(0.3, 1.0, n)
        above = int(np.sum(values > 0))
        assert sign_test(values, 0.0, "greater").p_value == pytest.approx(binomtest(above, n, 0.5).pvalue)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40, unique=True),
       st.floats(-1e6, 1e6, allow_nan=False))
def test_interval_excludes_the_reference_exactly_when_p_is_below_alpha(values, reference):
    values = [v for v in values if v != reference] or [reference + 1.0]
    t = sign_test(values, reference, "greater")
    excluded = not (t.ci_low <= reference <= t.ci_high)
    assert excluded == (t.p_value < 0.05)
    assert t.ci_low <= t.median <= t.ci_high
    assert (t.verdict == "inconclusive") == (not excluded)


def test_interval_covers_the_true_median_at_least_95_percent():
    rng = np.random.default_rng(0)
    for n in (6, 12, 30):
        samples = np.sort(rng.exponential(1.0, (20000, n)), axis=1)  # skewed: median log 2, mean 1
        k = order_statistic_rank(n)
        low, high, coverage = median_interval(samples[0])
        assert (low, high) == (samples[0, k - 1], samples[0, n - k])
        covered = (samples[:, k - 1] <= np.log(2)) & (np.log(2) <= samples[:, n - k])
        assert coverage >= 0.95
        assert np.mean(covered) == pytest.approx(coverage, abs=0.01)


def test_order_statistic_rank_is_the_largest_admissible():
    for m in range(1, 60):
        k = order_statistic_rank(m)
        from scipy.stats import binom

        if k:
            assert 2 * binom.cdf(k - 1, m, 0.5) <= 0.05
        assert k == m // 2 or 2 * binom.cdf(k, m, 0.5) > 0.05


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_poisson_binomial_matches_enumeration(probs):
    expected = np.zeros(len(probs) + 1)
    for outcome in itertools.product((0, 1), repeat=len(probs)):
        expected[sum(outcome)] += np.prod([p if o else 1 - p for p, o in zip(probs, outcome)])
    np.testing.assert_allclose(poisson_binomial_pmf(probs), expected, atol=1e-12)


def test_rule_pass_rate():
    # exchangeable null, n = 12: the rule holds iff ≥ 10 units are on the claimed side
    assert rule_pass_rate([0.5] * 12) == pytest.approx(79 / 4096)
    assert rule_pass_rate([1.0] * 12) == 1.0 and rule_pass_rate([0.0] * 12) == 0.0
    assert rule_pass_rate([0.99] * 5) == 0.0  # n = 5 can never hold
    # against a simulation of the rule itself (sign_test's verdict on ±1 values)
    rng = np.random.default_rng(1)
    probs = np.linspace(0.6, 0.95, 12)
    sides = rng.random((600, 12)) < probs
    simulated = np.mean([sign_test(np.where(s, 1.0, -1.0), 0.0, "greater").verdict == "holds" for s in sides])
    assert rule_pass_rate(probs) == pytest.approx(simulated, abs=3 * np.sqrt(0.25 / 600))


def test_combine_verdicts_and_bad_input():
    assert combine_verdicts(["holds", "holds"]) == "holds"
    assert combine_verdicts(["holds", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["inconclusive", "does not hold", "holds"]) == "does not hold"
    with pytest.raises(LoraAnalysisError):
        sign_test([1.0, float("nan")], 0.0, "greater")
    with pytest.raises(LoraAnalysisError):
        sign_test([1.0], 0.0, "up")


@pytest.mark.parametrize("n", [0, 1, 5, 24, 60, 200])
def test_binomial_half_cdf_is_exact(n):
    """Against exact rational arithmetic (scipy's binom.cdf is off in the last digits at n = 200)."""
    for k in range(-1, n + 2):
        exact = Fraction(sum(math.comb(n, j) for j in range(min(k, n) + 1)), 2**n)
        assert binomial_half_cdf(k, n) == float(exact)
        assert binomial_half_cdf(k, n) == pytest.approx(float(binom.cdf(k, n, 0.5)), rel=1e-13, abs=1e-300)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=12), st.sampled_from([0.05, 0.01]))
def test_mean_interval_is_scipys_t_interval(values, alpha):
    """Oracle: scipy's t interval; the interval covers the true mean 95 % of the time (below)."""
    from scipy import stats

    got = mean_interval(values, alpha)
    x = np.asarray(values)
    assert got.mean == pytest.approx(x.mean(), rel=1e-12, abs=1e-9)
    if np.ptp(x) > 0:
        low, high = stats.t.interval(1 - alpha, x.size - 1, loc=x.mean(), scale=stats.sem(x))
        assert (got.low, got.high) == pytest.approx((low, high), rel=1e-9, abs=1e-9)
    assert got.low <= got.mean <= got.high and got.n == x.size


def test_mean_interval_coverage_on_normal_samples():
    """Over 4,000 samples of n = 3 from N(0.8, 0.02²), the 95 % interval covers 0.8 in
    95 % ± 1.1 % (three binomial standard errors) of them."""
    rng = np.random.default_rng(0)
    covered = [(m := mean_interval(rng.normal(0.8, 0.02, 3))).low <= 0.8 <= m.high for _ in range(4000)]
    assert abs(np.mean(covered) - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 4000)


def test_mean_interval_refuses_one_value_or_nan():
    with pytest.raises(LoraAnalysisError):
        mean_interval([0.5])
    with pytest.raises(LoraAnalysisError):
        mean_interval([0.5, float("nan")])
