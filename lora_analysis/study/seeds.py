"""Accuracies over seeds, the statistics the accuracy questions (4–7) share: a mean with its
t interval, Welch's comparison of two settings, Holm's correction, and "within one standard
error".

A seed is the unit: each cell's final validation accuracy is one value, and two settings are
compared as two independent samples of seeds (different training runs share no randomness
that pairs them), except where a value is derived from another of the same seed (a resized
adapter and its original), which `paired_difference` compares seed by seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..analysis.stats import ALPHA, mean_interval
from ..errors import LoraAnalysisError
from ..training import cell_name, full_cell_name
from .types import StudyRunsView


def lora_accuracies(runs: StudyRunsView, task: str, r: int, seeds: Sequence[int], targets: list[str] | str) -> list[float]:
    """Final validation accuracy of the LoRA cells (r, seed, targets), one per seed."""
    return [runs.accuracy(task, cell_name(r, seed, targets)) for seed in seeds]


def full_accuracies(runs: StudyRunsView, task: str, seeds: Sequence[int]) -> list[float]:
    """Final validation accuracy of the full fine-tuning cells, one per seed."""
    return [runs.accuracy(task, full_cell_name(seed)) for seed in seeds]


def summary(values: Sequence[float], alpha: float = ALPHA) -> dict:
    """{"values", "mean", "low", "high", "sem", "n"}: the values with their mean and two-sided
    (1 − α) Student-t interval (`mean_interval`); JSON-ready."""
    m = mean_interval(values, alpha)
    return {"values": [float(v) for v in values], "mean": m.mean, "low": m.low, "high": m.high, "sem": m.sem, "n": m.n}


@dataclass(frozen=True)
class Welch:
    """Welch's two-sample comparison of b against a: difference = mean(b) − mean(a);
    se = √(s_a²/n_a + s_b²/n_b); df (Welch–Satterthwaite); [low, high] the two-sided
    (1 − α) interval difference ± t_{df}·se; p_value two-sided. With se = 0 (both samples
    constant) the difference is known exactly: p = 0 when it is not 0, else 1."""

    difference: float
    se: float
    df: float
    low: float
    high: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def welch(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Welch:
    """`Welch` of b − a (each at least two finite values)."""
    from scipy import stats

    x, y = _sample(a), _sample(b)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    difference = float(y.mean() - x.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        df = float(x.size + y.size - 2)
        return Welch(difference, 0.0, df, difference, difference, 0.0 if difference else 1.0)
    df = float((va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1)))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    p_value = float(min(1.0, 2.0 * stats.t.sf(abs(difference) / se, df)))
    return Welch(difference, se, df, difference - half, difference + half, p_value)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): sorted ascending, the j-th
    (0-based) of m becomes max over i ≤ j of min(1, (m − i)·p_(i)). Rejecting where the
    adjusted p < α keeps the family-wise error ≤ α."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (p.size - i) * p[index]))
        adjusted[index] = running
    return [float(v) for v in adjusted]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean of b_s − a_s over seeds s, its standard error sd/√n): two values per seed."""
    x, y = _sample(a), _sample(b)
    if x.size != y.size:
        raise LoraAnalysisError(f"paired values need one per seed on both sides, got {x.size} and {y.size}")
    d = y - x
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


BOUNDARY_SLACK = 1e-9  # relative: accuracies are multiples of 1/n, so exact ties at −SE occur


def within_one_se(difference: float, se: float) -> bool:
    """The rule "as accurate as the reference within one standard error": the candidate's mean
    minus the reference's (`difference`) is ≥ −se. Better than the reference counts as within.
    A difference on the boundary counts as within whatever the float rounding (accuracies are
    multiples of 1/n_val: two seeds, one unchanged, give |mean| = SE exactly)."""
    return difference >= -se - BOUNDARY_SLACK * max(abs(difference), se)


def draw_seeds(ax, x: float, group: dict, color: str) -> None:
    """One setting of a `summary` at position x: each seed's value as a dot (left of x), the mean
    with its t interval as a square with error bar (right of x)."""
    values = np.asarray(group["values"])
    spread = np.linspace(-0.06, 0.06, values.size) if values.size > 1 else np.zeros(1)
    ax.plot(x - 0.14 + spread, values, "o", ms=3, color=color, alpha=0.8)
    ax.errorbar([x + 0.14], [group["mean"]], yerr=[[group["mean"] - group["low"]], [group["high"] - group["mean"]]],
                fmt="s", ms=4, capsize=3, color="0.2")


def _sample(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise LoraAnalysisError(f"a comparison over seeds needs at least two finite values, got {x.tolist()}")
    return x
