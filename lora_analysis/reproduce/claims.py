"""The paper's Section 7 claims as tests on the trained sweep.

Each claim is made of parts; each part pools n units (every layer × both seeds, or every
layer for a comparison between seeds), takes one value per unit, and runs the sign test of
`analysis.stats` against a reference on the side the paper claims: effect = median with its
≥ 95 % order-statistic interval, exact two-sided p, verdict. Each part also states its null
(what random directions give, closed form or `null_draws` Haar-random draws) and the
probability that the rule says "holds" under that null; above α the part "holds trivially
under the null". A claim holds when every part holds, trivially when every part does so
trivially.

    (a) Fig. 3  r = 8 and r = 64 share their top direction: φ(A_8, A_64, 1, 1) > 0.5, per projection.
    (b) Fig. 4  ΔW_q has a higher intrinsic rank than ΔW_v: seeds share more of ΔW_q's top directions.
    (c) Tab. 7  amplification ‖ΔW‖_F / ‖U_ΔᵀWV_Δ‖_F is larger at r = 4 than at r = 64.
    (d) Tab. 7  ΔW's directions are not W's top directions, yet closer to W than random ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..analysis.nulls import phi_column_null, projection_null_moments
from ..analysis.stats import ALPHA, SignTest, Side, combine_verdicts, rule_pass_rate, sign_test
from .section7 import Section7, short

TOP_DIRECTION_THRESHOLD = 0.5  # paper Sec. 7.2: "φ > 0.5" for the top direction
SHARED_TOP = 8  # (b) compares the top-8 directions: beyond them φ between seeds sits at chance
NOT_TOP_RATIO = 0.1  # (d) "not in W's top directions": < 10 % of W's own (paper: 1.5 % at r = 4)
PAPER_AMPLIFICATION = {4: 6.91 / 0.32, 64: 3.57 / 1.90}
TRIVIAL = "holds trivially under the null"


@dataclass
class ClaimPart:
    """One test: `statistic` per unit (`units`, `values`) against `test.reference`.

    null: the null in words with its numbers; null_probs: per unit, P(value on the claimed
    side) under it; null_pass_rate: P(the rule says "holds" | null); extra: numbers shown
    beside the effect (e.g. the medians behind a difference).
    """

    label: str
    statistic: str
    units: list[str]
    values: list[float]
    test: SignTest
    null: str
    null_probs: list[float]
    extra: dict = field(default_factory=dict)

    @property
    def null_pass_rate(self) -> float:
        return rule_pass_rate(self.null_probs, self.test.alpha)

    @property
    def trivial(self) -> bool:
        return self.test.verdict == "holds" and self.null_pass_rate > self.test.alpha

    @property
    def verdict(self) -> str:
        return TRIVIAL if self.trivial else self.test.verdict

    def to_dict(self) -> dict:
        return {
            "label": self.label, "statistic": self.statistic, "units": self.units, "values": self.values,
            "test": asdict(self.test), "null": self.null, "null_probs": self.null_probs,
            "null_pass_rate": self.null_pass_rate, "verdict": self.verdict, "extra": self.extra,
        }


@dataclass
class Claim:
    """One of the paper's claims ("a".."d"), in words, with the paper's numbers and its tested parts."""

    key: str
    claim: str
    paper: str
    parts: list[ClaimPart]

    @property
    def verdict(self) -> str:
        """Holds when every part holds (trivially when every part does), else the worst part's verdict."""
        combined = combine_verdicts([p.test.verdict for p in self.parts])
        return TRIVIAL if combined == "holds" and all(p.trivial for p in self.parts) else combined

    def to_dict(self) -> dict:
        return {"key": self.key, "claim": self.claim, "paper": self.paper, "verdict": self.verdict,
                "parts": [p.to_dict() for p in self.parts]}


def section7_claims(s7: Section7) -> list[Claim]:
    """Claims (a)–(d); (b) only when two projections are compared."""
    claims = [top_direction(s7)]
    if len(s7.targets) > 1:
        claims.append(seed_rank(s7))
    return claims + [amplification(s7), not_top_but_above_random(s7)]


def _part(label: str, statistic: str, units: list[str], values: Sequence[float] | np.ndarray, reference: float, side: Side,
          null: str, null_probs: Sequence[float], extra: dict | None = None) -> ClaimPart:
    values = [float(v) for v in values]
    return ClaimPart(label, statistic, units, values, sign_test(values, reference, side, ALPHA), null,
                     [float(p) for p in null_probs], extra or {})


def _unit_labels(units: list[tuple[int, int]]) -> list[str]:
    return [f"layer {layer}, seed {seed}" for layer, seed in units]


# (a) ------------------------------------------------------------------------------------------
def top_direction(s7: Section7) -> Claim:
    parts = []
    for target in s7.targets:
        comparisons = [s7.rank_comparison(target, layer, seed) for layer, seed in s7.units]
        d = comparisons[0].dim
        exceed = float(phi_column_null(1, d).sf(TOP_DIRECTION_THRESHOLD))
        parts.append(_part(
            f"ΔW_{short(target)}", "φ(A_8, A_64, 1, 1), r = 8 and r = 64 adapters of the same seed",
            _unit_labels(s7.units), [c.phi_11 for c in comparisons], TOP_DIRECTION_THRESHOLD, "greater",
            f"random directions: φ(1, 1) ~ Beta(1/2, (d − 1)/2), mean 1/d = {1 / d:.2g} (d = {d}), "
            f"P(φ > {TOP_DIRECTION_THRESHOLD:g}) = {exceed:.1g}",
            [exceed] * len(comparisons),
        ))
    return Claim("a", f"r = 8 and r = 64 adapters share their top direction: φ(A_8, A_64, 1, 1) > "
                      f"{TOP_DIRECTION_THRESHOLD:g} (Fig. 3)",
                 f"> {TOP_DIRECTION_THRESHOLD:g} for ΔW_q and ΔW_v (GPT-3, layer 48)", parts)


# (b) ------------------------------------------------------------------------------------------
def shared_top(s7: Section7, target: str, layer: int) -> float:
    """Mean of φ(A_64, A'_64, i, i) over i = 1..SHARED_TOP between the two seeds."""
    return float(np.mean(np.diagonal(s7.seed_comparison(target, layer).grid)[:SHARED_TOP]))


def seed_rank(s7: Section7) -> Claim:
    q, v = s7.targets[0], s7.targets[-1]
    layers = s7.runs.layers
    shared = {t: [shared_top(s7, t, layer) for layer in layers] for t in (q, v)}
    d = s7.seed_comparison(q, layers[0]).dim
    chance = (SHARED_TOP + 1) / 2 / d  # mean of i/d over i = 1..8
    a, b = s7.seeds
    part = _part(
        f"ΔW_{short(q)} − ΔW_{short(v)}",
        f"mean of φ(A_64, A'_64, i, i) over i = 1..{SHARED_TOP} (seeds {a} and {b}), ΔW_{short(q)} minus ΔW_{short(v)}",
        [f"layer {layer}" for layer in layers], np.subtract(shared[q], shared[v]), 0.0, "greater",
        f"ΔW_{short(q)} and ΔW_{short(v)} exchangeable: P(difference > 0) = 1/2 per layer; "
        f"chance level of each mean: {(SHARED_TOP + 1) / 2:g}/d = {chance:.2g}",
        [0.5] * len(layers),
        extra={f"median ΔW_{short(t)}": float(np.median(shared[t])) for t in (q, v)} | {"chance": chance},
    )
    return Claim("b", f"ΔW_q has a higher intrinsic rank than ΔW_v: two seeds share more of ΔW_q's top "
                      f"directions (Fig. 4)", "more common directions for ΔW_q than ΔW_v", [part])


# (c) ------------------------------------------------------------------------------------------
def amplification(s7: Section7) -> Claim:
    target = s7.targets[0]
    low, high = 4, 64
    amps: dict[int, list[float]] = {low: [], high: []}
    null_probs: list[float] = []
    for layer, seed in s7.units:
        norms = s7.projections(target, layer, seed)
        for r in (low, high):
            amps[r].append(norms[r].amplification)
        # Random directions with this unit's ‖ΔW‖: amp(4) > amp(64) ⟺ X_64 > X_4 · ‖ΔW_64‖ / ‖ΔW_4‖.
        ratio = norms[high].delta_norm / norms[low].delta_norm
        null_probs.append(_probability_greater(s7.projection_null(target, layer, high),
                                               ratio * s7.projection_null(target, layer, low)))
    q = short(target)
    part = _part(
        f"ΔW_{q}",
        f"amplification(r = {low}) / amplification(r = {high}); amplification = ‖ΔW_{q}‖_F / ‖UᵀW_{q}V‖_F, "
        f"U, V the top-r singular vectors of the rank-r adapter's ΔW_{q} (same seed); below 1 it amplifies "
        f"nothing: ΔW_{q} is smaller than W_{q}'s own component along those directions",
        _unit_labels(s7.units), np.divide(amps[low], amps[high]), 1.0, "greater",
        f"random directions with each adapter's ‖ΔW_{q}‖_F ({s7.null_draws} Haar draws of U, V per rank): "
        f"median P(amp({low}) > amp({high})) = {np.median(null_probs):.3g} per unit",
        null_probs,
        extra={f"median amplification (r = {r})": float(np.median(amps[r])) for r in (low, high)},
    )
    return Claim("c", f"ΔW amplifies its directions more at low rank: amplification(r = {low}) > "
                      f"amplification(r = {high}) (Table 7, W_q)",
                 f"{PAPER_AMPLIFICATION[low]:.1f} vs {PAPER_AMPLIFICATION[high]:.1f}", [part])


def _probability_greater(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) for independent X, Y given by samples: the fraction of all pairs (x_a, y_b) with x_a > y_b."""
    y = np.sort(y)
    return float(np.searchsorted(y, x, side="left").sum() / (x.size * y.size))


# (d) ------------------------------------------------------------------------------------------
def not_top_but_above_random(s7: Section7) -> Claim:
    target = s7.targets[0]
    q = short(target)
    norms = {(layer, seed): s7.projections(target, layer, seed) for layer, seed in s7.units}
    units = _unit_labels(s7.units)
    r = 4
    ratios = [norms[u][r].delta / norms[u][r].weight for u in s7.units]
    not_top = _part(
        f"not in W_{q}'s top directions (r = {r})",
        f"‖U_ΔᵀW_{q}V_Δ‖_F / ‖U_WᵀW_{q}V_W‖_F: ΔW_{q}'s top-{r} directions against W_{q}'s own",
        units, ratios, NOT_TOP_RATIO, "less",
        f"random directions ({s7.null_draws} Haar draws): median ratio "
        f"{np.median([np.median(s7.projection_null(target, layer, r)) / norms[(layer, seed)][r].weight for layer, seed in s7.units]):.2g}",
        [float(np.mean(s7.projection_null(target, layer, r) < NOT_TOP_RATIO * norms[(layer, seed)][r].weight))
         for layer, seed in s7.units],
    )
    return Claim(
        "d", f"ΔW is not in W's top directions (‖U_ΔᵀWV_Δ‖_F < {NOT_TOP_RATIO:g} × W's own), yet correlates with W "
             f"more than random directions (Table 7, W_q)",
        "‖UᵀW_qV‖_F: ΔW_q 0.32, W_q 21.67, random 0.02 (r = 4); 1.90, 37.71, 0.33 (r = 64)",
        [not_top, *(_above_random(s7, target, r, norms) for r in (4, 64))],
    )


def _above_random(s7: Section7, target: str, r: int, norms: dict) -> ClaimPart:
    q = short(target)
    ratios, p_values, moments = [], [], []
    for layer, seed in s7.units:
        null = s7.projection_null(target, layer, r)
        observed = norms[(layer, seed)][r].delta
        ratios.append(observed / np.median(null))
        p_values.append((1 + np.sum(null >= observed)) / (1 + null.size))
        W = s7.weight_spectrum(target, layer)
        moments.append(projection_null_moments(W.S.numpy(), W.U.shape[0], W.V.shape[0], r))
    mean_sq, var_sq = np.median([m for m, _ in moments]), np.median([v for _, v in moments])
    significant = int(np.sum(np.asarray(p_values) < ALPHA))
    return _part(
        f"more than random (r = {r})",
        f"‖U_ΔᵀW_{q}V_Δ‖_F / median of ‖UᵀW_{q}V‖_F over {s7.null_draws} Haar-random U, V (r = {r})",
        _unit_labels(s7.units), ratios, 1.0, "greater",
        f"Haar-random U, V: P(ratio > 1) = 1/2 per unit; closed form E‖UᵀW_{q}V‖²_F = r²‖W_{q}‖²_F/(d_out·d_in) "
        f"= {mean_sq:.3g}, sd {np.sqrt(var_sq):.2g} (median over layers); units above their own null at p < {ALPHA:g}: "
        f"{significant}/{len(ratios)}",
        [0.5] * len(ratios),
        extra={"unit_p_values": [float(p) for p in p_values]},
    )

