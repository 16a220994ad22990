"""Question 1: is full fine-tuning's own ΔW = W_ft − W₀ low rank?

The paper's premise (Hu et al. 2021, Sec. 1 and 4.1, after Aghajanyan et al. 2020): the update of
full fine-tuning has a low "intrinsic rank". Each unit is one module's ΔW of the main task's full
fine-tuning (every projection type × layer × seed). Per unit: the singular values normalised by
‖ΔW‖_F, the energy rank at τ = 90 % and 99 % (smallest k with Σ_{i≤k}σ² ≥ τΣσ²) as a fraction of
d = min(d_out, d_in), and the number of σᵢ/‖ΔW‖_F above the Marchenko–Pastur edge of a
same-shape Gaussian of equal norm.

The null is a same-shape random matrix (i.i.d. Gaussian entries) of equal norm, in closed form
(`MarchenkoPastur`): its normalised spectrum, its edge 1/√d_out + 1/√d_in and its energy-rank
fractions. The fractions of a random matrix concentrate (spread O(1/d)) at the closed-form
value, which is therefore the null's median: each unit lies below it with probability ½.

Verdicts (sign tests over every unit, `verdicts.sign_verdict`):
  1. energy rank at 90 % below the random matrix's (ratio to the null < 1);
  2. the same at 99 %;
  3. low enough for LoRA: 90 % of ΔW's energy within rank max(ranks) (the largest LoRA rank
     of the study), i.e. energy rank at 90 % < max(ranks) + ½.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from ..analysis.spectrum import rank_metrics
from ..analysis.stats import sign_test
from .deltas import PROJECTIONS, full_svds
from .types import Answer, StudyRunsView, StudyVerdict
from .verdicts import num, sign_verdict

KEY = "full_ft_spectrum"
TAUS = (0.9, 0.99)
QUESTION = "Is fine-tuning's own ΔW low rank?"
EXPECTATION = ("The update of full fine-tuning has a low intrinsic rank, so a low-rank LoRA can represent it: "
               "its spectrum decays far faster than a random matrix's of the same shape and norm.")
SOURCE = "the paper's premise (Hu et al. 2021, Sec. 1 and 4.1, after Aghajanyan et al. 2020)"
THETA_GRID = 200_001  # quadrature nodes of the Marchenko–Pastur integrals (error ≪ 1/d)


@dataclass(frozen=True)
class MarchenkoPastur:
    """The spectrum of a (d_out, d_in) matrix with i.i.d. centred entries, normalised by its
    Frobenius norm, as d_out, d_in → ∞ at fixed ratio y = n/m (n = min, m = max of the two).

    The eigenvalues λ of XᵀX/m (n of them, mean 1) follow the Marchenko–Pastur law with density
    √((b − λ)(λ − a)) / (2π y λ) on [a, b] = [(1 − √y)², (1 + √y)²]; the normalised singular
    values are σ/‖X‖_F = √(λ/n). Integrals use λ = (a + b)/2 + (b − a)/2·cos θ, which removes the
    square-root singularities at the edges (trapezoid rule on `THETA_GRID` nodes).
    """

    d_out: int
    d_in: int

    @property
    def n(self) -> int:
        return min(self.d_out, self.d_in)

    @property
    def ratio(self) -> float:
        return self.n / max(self.d_out, self.d_in)

    @property
    def edge(self) -> float:
        """Largest σ/‖X‖_F: √(b/n) = 1/√d_out + 1/√d_in."""
        return 1 / math.sqrt(self.d_out) + 1 / math.sqrt(self.d_in)

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(λ descending, P(Λ ≥ λ), share of the energy in eigenvalues ≥ λ) on the θ grid."""
        y = self.ratio
        a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
        theta = np.linspace(0.0, math.pi, THETA_GRID)
        lam = (a + b) / 2 + (b - a) / 2 * np.cos(theta)
        half = (b - a) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(lam > 0, half * half * np.sin(theta) ** 2 / (2 * math.pi * y * lam), 0.0)
        if a == 0.0:  # square: λ = half·(1 + cos θ), so sin²θ/λ = (1 − cos θ)/half, finite at θ = π
            weight[-1] = half * 2 / (2 * math.pi * y)
        step = theta[1] - theta[0]
        mass = np.concatenate([[0.0], np.cumsum((weight[1:] + weight[:-1]) / 2 * step)])
        energy_density = lam * weight
        energy = np.concatenate([[0.0], np.cumsum((energy_density[1:] + energy_density[:-1]) / 2 * step)])
        return lam, mass / mass[-1], energy / energy[-1]

    def energy_rank_fraction(self, tau: float) -> float:
        """The fraction of n in the top eigenvalues that hold a share τ of the energy."""
        _, mass, energy = self._tables
        return float(np.interp(tau, energy, mass))

    def normalized_spectrum(self) -> np.ndarray:
        """σᵢ/‖X‖_F, i = 1..n, at the quantiles (i − ½)/n of the law, descending."""
        lam, mass, _ = self._tables
        quantiles = (np.arange(self.n) + 0.5) / self.n
        return np.sqrt(np.maximum(np.interp(quantiles, mass, lam), 0.0) / self.n)


@lru_cache(maxsize=32)
def marchenko_pastur(d_out: int, d_in: int) -> MarchenkoPastur:
    """The law of a shape, its integral tables computed once."""
    return MarchenkoPastur(d_out, d_in)


@dataclass(frozen=True)
class Unit:
    """One module's ΔW: normalised singular values σ/‖ΔW‖_F (descending) and its shape."""

    seed: int
    projection: str
    layer: int
    shape: tuple[int, int]
    normalized: np.ndarray
    norm: float


def unit_numbers(unit: Unit, max_rank: int) -> dict[str, Any]:
    """The measures of one unit (see the module doc) and its null's."""
    null = marchenko_pastur(*unit.shape)
    metrics = rank_metrics(unit.normalized, TAUS)
    d = null.n
    numbers: dict[str, Any] = {"seed": unit.seed, "projection": unit.projection, "layer": unit.layer,
                               "shape": list(unit.shape), "norm": unit.norm,
                               "above_edge": int(np.sum(unit.normalized > null.edge)), "mp_edge": null.edge,
                               "within_max_rank": float(np.sum(unit.normalized[:max_rank] ** 2))}
    for tau in TAUS:
        tag = _tag(tau)
        rank = int(metrics.resolved("energy_rank", tau))
        fraction = rank / d
        numbers[f"energy_rank_{tag}"] = rank
        numbers[f"fraction_{tag}"] = fraction
        numbers[f"null_fraction_{tag}"] = null.energy_rank_fraction(tau)
        numbers[f"ratio_{tag}"] = fraction / null.energy_rank_fraction(tau)
    return numbers


def _tag(tau: float) -> str:
    return f"{round(tau * 100)}"


def verdicts(units: list[dict[str, Any]], max_rank: int) -> list[StudyVerdict]:
    """The three verdicts of the module doc, from `unit_numbers` of every unit."""
    found = []
    for tau in TAUS:
        tag = _tag(tau)
        test = sign_test([u[f"ratio_{tag}"] for u in units], 1.0, "less")
        v = sign_verdict(test, [0.5] * len(units),
                         f"(energy rank at {tag} % / d) ÷ (a same-shape random matrix's, Marchenko–Pastur)",
                         "the random matrix: ratio 1, the null's median (closed form)")
        v.effect = f"energy rank at {tag} % below a random matrix's: ratio " + v.effect
        found.append(v)
    limit = max_rank + 0.5
    test = sign_test([u["energy_rank_90"] for u in units], limit, "less")
    # A random matrix's 90 % energy rank is ~ n·fraction ≫ max_rank: it never passes this rule.
    null_probs = [1.0 if u["null_fraction_90"] * min(u["shape"]) < limit else 0.0 for u in units]
    v = sign_verdict(test, null_probs, "the energy rank at 90 % (k with Σ_(i≤k)σ² ≥ 0.9Σσ²)",
                     f"rank {max_rank}, the study's largest LoRA rank: values ≤ {max_rank} mean a "
                     f"rank-{max_rank} LoRA can hold 90 % of ΔW")
    v.effect = f"90 % of ΔW within rank {max_rank}: energy rank " + v.effect
    found.append(v)
    return found


def curves(units: list[Unit]) -> dict[str, dict[str, Any]]:
    """Per projection: the median and 10 %/90 % quantiles of σᵢ/‖ΔW‖_F over its units, the
    random matrix's (closed form) and its edge."""
    out: dict[str, dict[str, Any]] = {}
    for projection in PROJECTIONS:
        mine = [u for u in units if u.projection == projection]
        if not mine:
            continue
        stack = np.stack([u.normalized for u in mine])
        null = marchenko_pastur(*mine[0].shape)
        out[projection] = {"shape": list(mine[0].shape), "median": np.median(stack, axis=0).tolist(),
                           "q10": np.quantile(stack, 0.1, axis=0).tolist(),
                           "q90": np.quantile(stack, 0.9, axis=0).tolist(),
                           "random": null.normalized_spectrum().tolist(), "mp_edge": null.edge, "units": len(mine)}
    return out


def measure(runs: StudyRunsView) -> list[Unit]:
    config = runs.config
    units = []
    for seed in config.seeds:
        for (projection, layer), svd in sorted(full_svds(runs, config.main_task, seed).items()):
            norm = float(np.sqrt(np.sum(svd.S ** 2)))
            if norm == 0.0:
                continue  # an untouched weight has no spectrum to compare
            units.append(Unit(seed, projection, layer, svd.shape, svd.S / norm, norm))
    return units


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    max_rank = max(config.ranks)
    units = measure(runs)
    rows = [unit_numbers(u, max_rank) for u in units]
    found = verdicts(rows, max_rank)
    per_projection = {
        p: {f"median_fraction_{_tag(t)}": float(np.median([r[f"fraction_{_tag(t)}"] for r in rows if r["projection"] == p]))
            for t in TAUS} | {f"null_fraction_{_tag(t)}": next(r[f"null_fraction_{_tag(t)}"] for r in rows if r["projection"] == p)
                              for t in TAUS}
        | {"median_above_edge": float(np.median([r["above_edge"] for r in rows if r["projection"] == p]))}
        for p in PROJECTIONS if any(r["projection"] == p for r in rows)}
    numbers = {"task": config.main_task, "seeds": list(config.seeds), "max_rank": max_rank, "taus": list(TAUS),
               "units": rows, "per_projection": per_projection, "curves": curves(units)}
    median90 = float(np.median([r["fraction_90"] for r in rows]))
    median_null = float(np.median([r["null_fraction_90"] for r in rows]))
    median_rank = float(np.median([r["energy_rank_90"] for r in rows]))
    measurement = (
        f"Over {len(rows)} modules ({len(per_projection)} projection types × layers × {len(config.seeds)} seeds of full "
        f"fine-tuning on {config.main_task}), 90 % of ΔW's energy takes a median {num(median90 * 100)} % of its "
        f"dimension (energy rank {num(median_rank)}), against {num(median_null * 100)} % for a same-shape random "
        f"matrix. A median {num(float(np.median([r['above_edge'] for r in rows])))} singular values per module stand "
        f"above the random matrix's Marchenko–Pastur edge.")
    return Answer(KEY, QUESTION, EXPECTATION, SOURCE, measurement, found, numbers, time.perf_counter() - start)


def plot(answer: Answer, figure) -> None:
    """One panel per projection type: σᵢ/‖ΔW‖_F against i (log-log), median over layers × seeds
    with its 10–90 % band, the random matrix of equal norm and its Marchenko–Pastur edge."""
    curves_ = answer.numbers["curves"]
    projections = list(curves_)
    ncols = 3
    nrows = max(1, math.ceil(len(projections) / ncols))
    figure.set_size_inches(6.75, 2.1 * nrows + 0.5)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(projections):]:
        ax.set_visible(False)
    for ax, projection in zip(axes.flat, projections):
        c = curves_[projection]
        i = np.arange(1, len(c["median"]) + 1)
        ax.fill_between(i, c["q10"], c["q90"], color="C0", alpha=0.25, linewidth=0)
        ax.plot(i, c["median"], color="C0", label="ΔW (median, 10–90 %)")
        ax.plot(i, c["random"], color="0.4", linestyle="--", label="random, equal norm")
        ax.axhline(c["mp_edge"], color="C3", linewidth=0.8, linestyle=":", label="MP edge")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{projection} {c['shape'][0]}×{c['shape'][1]}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("$i$", fontsize=7)
        ax.set_ylabel("$\\sigma_i / \\|\\Delta W\\|_F$", fontsize=7)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    figure.suptitle(f"Full fine-tuning's ΔW = W_ft − W₀ ({answer.numbers['task']}, seeds {answer.numbers['seeds']})",
                    fontsize=9)
    figure.tight_layout()
