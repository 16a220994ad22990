"""Verdicts of the study's questions from the tests of `analysis.stats`, in the study's words.

`analysis.stats` says "inconclusive"; the study says "inconclusive at this sample size" (the
test could not decide with the units it had). A sign-test rule that says "holds" with
probability above α when the null is true "holds trivially under the null" (as in
`reproduce.claims`): it says nothing beyond what random matrices give.

`trend_test` is the permutation test of a monotone trend over layers (question 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Sequence

import numpy as np

from ..analysis.stats import ALPHA, SignTest, Verdict, mean_interval, rule_pass_rate
from ..errors import LoraAnalysisError
from .types import StudyVerdict, VerdictText

INCONCLUSIVE: Final = "inconclusive at this sample size"
TRIVIAL: Final = "holds trivially under the null"
TREND_PERMUTATIONS = 10_000


def study_text(verdict: Verdict) -> VerdictText:
    """`analysis.stats`' verdict in the study's words."""
    if verdict == "inconclusive":
        return INCONCLUSIVE
    return verdict


def num(x: float) -> str:
    """3 significant digits; an unbounded interval end as ±∞."""
    if not math.isfinite(x):
        return "−∞" if x < 0 else "∞"
    return f"{x:.3g}"


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def sign_verdict(test: SignTest, null_probs: Sequence[float], statistic: str, null: str) -> StudyVerdict:
    """The study's verdict of a sign test over units (`analysis.stats.sign_test`).

    statistic: what each unit's value is, in words; null: the null and the reference in words;
    null_probs: per unit, P(value on the claimed side) under the null (for `rule_pass_rate`).
    """
    relation = ">" if test.side == "greater" else "<"
    pass_rate = rule_pass_rate(null_probs, test.alpha)
    verdict: VerdictText = study_text(test.verdict)
    if verdict == "holds" and pass_rate > test.alpha:
        verdict = TRIVIAL
    rule = (f"exact sign test over n units of {statistic}: holds when the order-statistic ≥ {1 - test.alpha:.0%} "
            f"interval of the median lies {relation} {num(test.reference)} ({null}), does not hold when it lies "
            f"on the other side, else inconclusive; holds trivially when the null passes the rule with "
            f"probability > {test.alpha:g} (here {pass_rate:.2g})")
    effect = (f"median {num(test.median)} [{num(test.ci_low)}, {num(test.ci_high)}] ({test.ci_coverage:.1%} CI), "
              f"{test.claim_side}/{test.n} units {relation} {num(test.reference)}, p = {p_text(test.p_value)}")
    return StudyVerdict(verdict, rule, effect)


@dataclass(frozen=True)
class TrendTest:
    """Monotone trend of a measure over ordered positions (layers), pooled over units.

    rho: per unit, Spearman's ρ between position and value (average ranks for ties; 0 for a
    constant unit); mean_rho with its Student-t interval over units (`mean_interval`, None
    bounds for a single unit); p_greater / p_less: one-sided permutation p-values of mean_rho
    (positions permuted independently in each unit, `permutations` seeded draws, (1 + #)/(1 + N));
    p_value: two-sided, 2·min, capped at 1. verdict: "holds" (increasing) when p_value < α
    and mean_rho > 0, "does not hold" when p_value < α and mean_rho < 0, else "inconclusive".
    """

    rho: list[float]
    mean_rho: float
    ci_low: float | None
    ci_high: float | None
    p_greater: float
    p_less: float
    p_value: float
    n_units: int
    n_positions: int
    permutations: int
    alpha: float
    verdict: Verdict


def spearman_rows(values: np.ndarray) -> np.ndarray:
    """Spearman's ρ between positions 0..n-1 and each row of `values` (units, n) → (units,);
    a constant row gives 0 (no trend)."""
    ranks = _average_ranks(values)
    positions = np.arange(values.shape[1], dtype=float)
    x = positions - positions.mean()
    y = ranks - ranks.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum() * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (y @ x) / denominator
    return np.where(denominator > 0, rho, 0.0)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank."""
    from scipy.stats import rankdata

    return np.asarray(rankdata(values, axis=-1), dtype=float)


def trend_test(values: Sequence[Sequence[float]] | np.ndarray, seed: int = 0, permutations: int = TREND_PERMUTATIONS,
               alpha: float = ALPHA) -> TrendTest:
    """`TrendTest` of `values` (units, positions), finite, ≥ 3 positions."""
    from ..seeding import derive_seed

    x = np.asarray(values, dtype=float)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 3 or not np.all(np.isfinite(x)):
        raise LoraAnalysisError(f"a trend test needs finite values of shape (units, ≥ 3 positions), got shape {x.shape}")
    rho = spearman_rows(x)
    observed = float(rho.mean())
    rng = np.random.default_rng(derive_seed(seed, "trend_test"))
    order = np.argsort(rng.random((permutations, *x.shape)), axis=-1)
    shuffled = np.take_along_axis(np.broadcast_to(x, (permutations, *x.shape)), order, axis=-1)
    null = spearman_rows(shuffled.reshape(-1, x.shape[1])).reshape(permutations, x.shape[0]).mean(axis=1)
    slack = 1e-12  # ties between the observed mean and a permuted one count as reaching it
    p_greater = float((1 + np.sum(null >= observed - slack)) / (1 + permutations))
    p_less = float((1 + np.sum(null <= observed + slack)) / (1 + permutations))
    p_value = min(1.0, 2 * min(p_greater, p_less))
    interval = mean_interval(rho, alpha) if rho.size >= 2 else None
    verdict: Verdict = "inconclusive"
    if p_value < alpha and observed != 0:
        verdict = "holds" if observed > 0 else "does not hold"
    return TrendTest([float(r) for r in rho], observed, interval.low if interval else None,
                     interval.high if interval else None, p_greater, p_less, p_value, int(x.shape[0]),
                     int(x.shape[1]), permutations, alpha, verdict)


def trend_verdict(test: TrendTest, measure: str) -> StudyVerdict:
    """The study's verdict of `trend_test` on `measure` (in words) increasing with depth."""
    rule = (f"permutation test of the mean Spearman ρ(layer, {measure}) over units (layers shuffled within each "
            f"unit, {test.permutations} seeded permutations): holds (increases with depth) when the two-sided "
            f"p < {test.alpha:g} and ρ > 0, does not hold when p < {test.alpha:g} and ρ < 0, else inconclusive at "
            f"this sample size")
    interval = (f" [{num(test.ci_low)}, {num(test.ci_high)}] (t interval over units)"
                if test.ci_low is not None and test.ci_high is not None else "")
    effect = (f"mean ρ {num(test.mean_rho)}{interval}, n = {test.n_units} units × {test.n_positions} layers, "
              f"p = {p_text(test.p_value)}")
    return StudyVerdict(study_text(test.verdict), rule, effect)
