"""Verdicts as tests: the exact sign test, its interval for the median, and how often a rule
says "holds" when the null is true.

A claim is checked on n units (layers × seeds): each unit gives a value, the claim says the
values lie on one side of a reference (a threshold, 0 for a difference, 1 for a ratio, or
the median of a null distribution). The test is the exact two-sided sign test of
H0: P(value > reference) = 1/2, units independent; the effect is the median value with the
distribution-free interval from order statistics that inverts the same test, so the interval
excludes the reference exactly when p < α. The verdict reads the interval:

    holds          the interval lies on the claimed side of the reference
    does not hold  it lies on the other side
    inconclusive   it contains the reference

`rule_pass_rate` gives the probability that this rule says "holds" when each unit is on the
claimed side with a known null probability (independent units, Poisson-binomial): a rule that
passes with probability > α under the null says nothing beyond the null ("holds trivially").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from ..errors import LoraAnalysisError

ALPHA = 0.05
Side = Literal["greater", "less"]
Verdict = Literal["holds", "does not hold", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("does not hold", "inconclusive", "holds")  # worst first


@dataclass(frozen=True)
class SignTest:
    """Exact sign test of `values` against `reference` on the claimed `side`, with the median's interval.

    n: units that differ from the reference (ties are dropped, as the sign test does);
    claim_side / other_side: units strictly on each side; p_value: exact two-sided
    2·P(Binomial(n, ½) ≤ min(claim_side, other_side)), capped at 1; median, ci_low, ci_high:
    the median of all values and the order-statistic interval [x_(k), x_(m−k+1)] (m values)
    whose exact coverage 1 − 2·P(Binomial(m, ½) ≤ k − 1) is the largest k keeping ≥ 1 − α
    (`ci_coverage`); with m ≤ 5 no such k exists and the interval is (−∞, ∞). verdict: see
    the module docstring.
    """

    reference: float
    side: Side
    n: int
    claim_side: int
    other_side: int
    p_value: float
    median: float
    ci_low: float
    ci_high: float
    ci_coverage: float
    alpha: float
    verdict: Verdict


def sign_test(values: Sequence[float] | np.ndarray, reference: float, side: Side, alpha: float = ALPHA) -> SignTest:
    """`SignTest` of per-unit `values` (finite) against `reference`; the claim is "values are `side` of it"."""
    x = np.sort(np.asarray(values, dtype=float))
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise LoraAnalysisError(f"a sign test needs finite values, got {list(values)}")
    if side not in ("greater", "less"):
        raise LoraAnalysisError(f"side must be 'greater' or 'less', got {side!r}")
    above, below = int(np.sum(x > reference)), int(np.sum(x < reference))
    claim_side, other_side = (above, below) if side == "greater" else (below, above)
    n = above + below
    p_value = min(1.0, 2.0 * binomial_half_cdf(min(above, below), n)) if n else 1.0
    ci_low, ci_high, coverage = median_interval(x, alpha)
    return SignTest(
        reference=float(reference), side=side, n=n, claim_side=claim_side, other_side=other_side,
        p_value=p_value, median=float(np.median(x)), ci_low=ci_low, ci_high=ci_high, ci_coverage=coverage,
        alpha=alpha, verdict=_verdict(ci_low, ci_high, reference, side, p_value, alpha),
    )


def binomial_half_cdf(k: int, n: int) -> float:
    """P(Binomial(n, ½) ≤ k), exactly: Σ_{j ≤ k} C(n, j) / 2ⁿ in integers, rounded once."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, j) for j in range(min(k, n) + 1)) / 2**n


def _verdict(low: float, high: float, reference: float, side: Side, p_value: float, alpha: float) -> Verdict:
    if p_value >= alpha or low <= reference <= high:
        return "inconclusive"
    above = low > reference
    return "holds" if above == (side == "greater") else "does not hold"


def order_statistic_rank(m: int, alpha: float = ALPHA) -> int:
    """The largest k ≥ 1 with 2·P(Binomial(m, ½) ≤ k − 1) ≤ α (0 when none: m too small)."""
    k = 0
    while k < m // 2 and 2.0 * binomial_half_cdf(k, m) <= alpha:
        k += 1
    return k


def median_interval(values: Sequence[float] | np.ndarray, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free interval for the median of i.i.d. values,
    [x_(k), x_(m−k+1)] with k = `order_statistic_rank(m, α)`; (−∞, ∞) with coverage 1 when
    k = 0 (m ≤ 5: no finite order-statistic interval reaches 1 − α)."""
    x = np.sort(np.asarray(values, dtype=float))
    m = x.size
    k = order_statistic_rank(m, alpha)
    if k == 0:
        return -math.inf, math.inf, 1.0
    coverage = 1.0 - 2.0 * binomial_half_cdf(k - 1, m)
    return float(x[k - 1]), float(x[m - k]), coverage


def poisson_binomial_pmf(probs: Sequence[float]) -> np.ndarray:
    """P(K = k), k = 0..n, for K the number of successes of independent trials with `probs`."""
    pmf = np.zeros(len(probs) + 1)
    pmf[0] = 1.0
    for i, p in enumerate(probs):
        pmf[1 : i + 2] = pmf[1 : i + 2] * (1.0 - p) + pmf[: i + 1] * p
        pmf[0] *= 1.0 - p
    return pmf


def rule_pass_rate(null_probs: Sequence[float], alpha: float = ALPHA) -> float:
    """P(the sign-test rule says "holds") when unit u is on the claimed side with probability
    null_probs[u], independently (no ties): the rule holds iff at most k − 1 units are on the
    other side, k = `order_statistic_rank(n, α)`."""
    probs = np.clip(np.asarray(null_probs, dtype=float), 0.0, 1.0)
    k = order_statistic_rank(probs.size, alpha)
    if k == 0:
        return 0.0
    pmf = poisson_binomial_pmf(probs)  # pmf[c] = P(c units on the claimed side)
    return float(min(1.0, pmf[probs.size - k + 1 :].sum()))


@dataclass(frozen=True)
class MeanInterval:
    """The mean of n values with its two-sided (1 − α) Student-t interval, mean ± t·s/√n
    (s: sample standard deviation; sem = s/√n). Assumes i.i.d. roughly normal values, e.g.
    accuracies over seeds."""

    mean: float
    low: float
    high: float
    sem: float
    n: int


def mean_interval(values: Sequence[float] | np.ndarray, alpha: float = ALPHA) -> MeanInterval:
    """`MeanInterval` of `values` (at least two, all finite)."""
    from scipy import stats  # here, not at the top: keeps scipy out of analyze's start-up

    x = np.asarray(values, dtype=float)
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise LoraAnalysisError(f"a t interval needs at least two finite values, got {x.tolist()}")
    mean = float(x.mean())
    sem = float(x.std(ddof=1) / math.sqrt(x.size))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, x.size - 1)) * sem
    return MeanInterval(mean, mean - half, mean + half, sem, int(x.size))


def combine_verdicts(verdicts: Sequence[Verdict]) -> Verdict:
    """A claim made of parts holds when every part holds (an intersection–union test: each part
    at level α keeps the whole at level α), does not hold when any part does not, else is
    inconclusive."""
    if not verdicts:
        raise LoraAnalysisError("no verdicts to combine")
    return min(verdicts, key=VERDICTS.index)

