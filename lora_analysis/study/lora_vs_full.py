"""Question 2: does LoRA find full fine-tuning's directions?

Each unit pairs one module of a LoRA adapter (rank r ∈ `compare_ranks`, on the study's LoRA
targets) with the same module of full fine-tuning **of the same seed** (LoRA seed s with
`full-s<s>`: same data order and classifier-head initialisation), on the main task. Per unit
and space (output: left singular vectors U; input: right singular vectors V):

    statistic = mean over i = 1..k of φ(i, i) between ΔW_LoRA's top-k and ΔW_full's top-k,
    k = min(8, r), φ(i, i) = ‖U_LoRA⁽ⁱ⁾ᵀ U_full⁽ⁱ⁾‖²_F / i (paper Eq. 4)

Chance for independent random subspaces: E φ(i, i) = i/d, so (k + 1)/(2d) for the mean. The
null is the statistic between a Haar-random k-frame and a fixed one (`null_draws` seeded draws
per d): its median is the reference of a sign test over layers × targets × seeds, one verdict
per rank and space ("above chance"). Two references without verdicts: LoRA against full
fine-tuning of another seed (does the pairing matter?), and full fine-tuning against itself
across two seeds (how much two full runs share).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..analysis import subspace_similarity
from ..analysis.nulls import haar_frames
from ..analysis.stats import sign_test
from ..seeding import seeded_generator
from ..training import cell_name
from .deltas import TOP_VECTORS, DeltaSVD, full_svds, lora_svds, target_projection
from .types import Answer, StudyRunsView, StudyVerdict
from .verdicts import num, sign_verdict

KEY = "lora_vs_full"
QUESTION = "Does LoRA find full fine-tuning's directions?"
EXPECTATION = ("If LoRA is a low-rank version of fine-tuning, ΔW of a LoRA adapter spans the top directions of full "
               "fine-tuning's ΔW on the same task: φ well above the chance level of random subspaces.")
SOURCE = ("the paper's framing of LoRA as the low-rank part of fine-tuning's update (Hu et al. 2021, Sec. 4.1 and 7); "
          "questioned by Shuttleworth et al. 2024 (\"LoRA vs Full Fine-tuning: An Illusion of Equivalence\")")
SPACES = {"output": "U", "input": "V"}


def top_phi(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """(mean of φ(i, i) over i ≤ k, φ(1, 1)) between orthonormal frames a: (d, ≥ k), b: (d, ≥ k)."""
    grid = subspace_similarity(a[:, :k], b[:, :k])
    return float(np.mean(np.diagonal(grid))), float(grid[0, 0])


def null_statistic(d: int, k: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws,) of the mean of φ(i, i), i ≤ k, between a Haar-random k-frame in Rᵈ and a fixed
    one (by rotation invariance, any fixed frame: the first k coordinate axes)."""
    frames = haar_frames(d, k, draws, seeded_generator(seed, "lora_vs_full", d, k)).double().numpy()
    block = frames[:, :k, :]  # rows 1..k = the frame's coordinates on the fixed axes: M = Eᵀ U, (draws, k, k)
    cumulative = np.cumsum(np.cumsum(block * block, axis=-2), axis=-1)
    i = np.arange(1, k + 1)
    return np.mean(cumulative[:, i - 1, i - 1] / i, axis=-1)


def pair_units(lora: dict, full: dict, projections: list[str], k: int, seed: int, full_seed: int) -> list[dict[str, Any]]:
    """The units of one LoRA cell against one full fine-tuning cell (module dicts of `deltas`)."""
    units = []
    for key in sorted(lora):
        projection, layer = key
        if projection not in projections or key not in full:
            continue
        a: DeltaSVD = lora[key]
        b: DeltaSVD = full[key]
        kk = min(k, a.U.shape[1], b.U.shape[1])
        row: dict[str, Any] = {"seed": seed, "full_seed": full_seed, "projection": projection, "layer": layer, "k": kk,
                               "d": {"output": a.shape[0], "input": a.shape[1]}}
        for space, attr in SPACES.items():
            row[space], row[f"{space}_phi11"] = top_phi(getattr(a, attr), getattr(b, attr), kk)
        units.append(row)
    return units


def verdict(units: list[dict[str, Any]], space: str, nulls: dict[tuple[int, int], np.ndarray], r: int) -> StudyVerdict:
    """Sign test of the units' statistic in `space` against the null median (per unit's d and k)."""
    ratios, null_probs = [], []
    for u in units:
        null = nulls[(u["d"][space], u["k"])]
        median = float(np.median(null))
        ratios.append(u[space] / median)
        null_probs.append(float(np.mean(null > median)))
    test = sign_test(ratios, 1.0, "greater")
    k = units[0]["k"] if units else min(TOP_VECTORS, r)
    return sign_verdict(test, null_probs,
                        f"mean φ(i, i), i ≤ {k}, between LoRA r = {r} and full fine-tuning ({space} space, same seed) "
                        f"÷ the null's median",
                        "random subspaces: ratio 1 at the median of Haar draws")


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    task = config.main_task
    projections = [target_projection(t) for t in config.lora_targets]
    seeds = list(config.seeds)
    full = {seed: full_svds(runs, task, seed) for seed in seeds}
    draws = int(config.null_draws or 1000)
    numbers: dict[str, Any] = {"task": task, "seeds": seeds, "projections": projections, "ranks": list(config.compare_ranks),
                               "pairing": "LoRA seed s with full fine-tuning seed s (same data order and head init); "
                                          "other_seed: LoRA seed s with full seed s' = the next seed in the list",
                               "by_rank": {}, "null": {}}
    found: list[StudyVerdict] = []
    nulls: dict[tuple[int, int], np.ndarray] = {}
    parts = []
    for r in config.compare_ranks:
        k = min(TOP_VECTORS, r)
        same, other = [], []
        for index, seed in enumerate(seeds):
            lora = lora_svds(runs, task, cell_name(r, seed, list(config.lora_targets)))
            same += pair_units(lora, full[seed], projections, k, seed, seed)
            other_seed = seeds[(index + 1) % len(seeds)]
            other += pair_units(lora, full[other_seed], projections, k, seed, other_seed)
        for d, kk in {(u["d"][s], u["k"]) for u in same for s in SPACES}:
            nulls.setdefault((d, kk), null_statistic(d, kk, draws))
        numbers["by_rank"][str(r)] = {"k": k, "units": same, "other_seed": other}
        for space in SPACES:
            v = verdict(same, space, nulls, r)
            v.effect = f"r = {r}, {space} space: " + v.effect
            found.append(v)
            parts.append((r, space, float(np.median([u[space] for u in same]))))
    numbers["null"] = {f"d={d},k={k}": {"d": d, "k": k, "median": float(np.median(null)),
                                        "q025": float(np.quantile(null, 0.025)), "q975": float(np.quantile(null, 0.975)),
                                        "chance": (k + 1) / (2 * d), "draws": draws}
                       for (d, k), null in sorted(nulls.items())}
    numbers["full_vs_full"] = _full_vs_full(full, seeds, projections)
    chance = list(numbers["null"].values())[-1]["chance"] if numbers["null"] else float("nan")
    ffull = numbers["full_vs_full"]
    measurement = (
        "Median over layers × {q, v} × seeds of the mean φ(i, i), i ≤ 8, between LoRA and full fine-tuning of the same "
        "seed: " + "; ".join(f"r = {r} {space} {num(m)}" for r, space, m in parts)
        + f" (chance {num(chance)}). Two full fine-tuning runs (seeds {ffull['seeds'][0]} and {ffull['seeds'][1]}) share "
        f"{num(ffull['median_output'])} (output) and {num(ffull['median_input'])} (input).")
    return Answer(KEY, QUESTION, EXPECTATION, SOURCE, measurement, found, numbers, time.perf_counter() - start)


def _full_vs_full(full: dict, seeds: list[int], projections: list[str]) -> dict[str, Any]:
    """The same statistic between the full fine-tuning runs of the first two seeds."""
    a, b = seeds[0], seeds[1]
    units = pair_units(full[a], full[b], projections, TOP_VECTORS, a, b)
    return {"seeds": [a, b], "units": units, **{f"median_{s}": float(np.median([u[s] for u in units])) for s in SPACES}}


def plot(answer: Answer, figure) -> None:
    """Per space, the statistic per layer: LoRA r = 8 and r = 64 against full fine-tuning (mean over
    seeds × targets, bars min–max), full against full, and the null's median with its 95 % range."""
    n = answer.numbers
    figure.set_size_inches(6.75, 2.6)
    axes = figure.subplots(1, len(SPACES), squeeze=False)[0]
    null = list(n["null"].values())[-1] if n["null"] else None  # the largest (d, k): the figure's scale
    for ax, space in zip(axes, SPACES):
        for index, (r, data) in enumerate(n["by_rank"].items()):
            _layer_curve(ax, data["units"], space, f"LoRA r = {r} vs full", f"C{index}", "o")
        _layer_curve(ax, n["full_vs_full"]["units"], space, "full vs full (2 seeds)", "0.3", "s", dashed=True)
        if null is not None:
            ax.axhspan(null["q025"], null["q975"], color="0.85", label="random: 95 % of draws")
            ax.axhline(null["median"], color="0.5", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("mean $\\phi(i, i)$, $i \\leq 8$", fontsize=7)
        ax.set_title(f"{space} space ({SPACES[space]})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    figure.suptitle(f"LoRA vs full fine-tuning, {n['task']} ({'/'.join(n['projections'])}, seeds {n['seeds']})", fontsize=9)
    figure.tight_layout()


def _layer_curve(ax, units: list[dict], space: str, label: str, color: str, marker: str, dashed: bool = False) -> None:
    layers = sorted({u["layer"] for u in units})
    values = [[u[space] for u in units if u["layer"] == layer] for layer in layers]
    mean = np.array([np.mean(v) for v in values])
    low = mean - np.array([np.min(v) for v in values])
    high = np.array([np.max(v) for v in values]) - mean
    ax.errorbar(layers, mean, yerr=[low, high], color=color, marker=marker, markersize=3, linewidth=1,
                linestyle="--" if dashed else "-", capsize=2, label=label)
