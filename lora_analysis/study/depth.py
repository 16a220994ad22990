"""Question 3: how does the needed rank change with depth?

A popular write-up of the paper conjectures that early layers, which change little, need lower
ranks than later ones. Per layer, for LoRA at r = `depth_rank` (on the study's targets) and for
full fine-tuning (every projection type), on the main task, per seed: the energy rank at 90 %
(smallest k with Σ_{i≤k}σ² ≥ 0.9Σσ², the rank a truncation needs), the energy effective rank
exp(H(σ²/Σσ²)) and ‖ΔW‖_F.

Each claim is a monotone trend over layers, tested by `verdicts.trend_test`: Spearman's ρ
between layer index and the measure in every unit (one seed × one projection type), averaged
over units, against the permutation null that shuffles the layers within each unit. With few
layers (6 on MiniLM) a weak trend cannot be told from none: the verdict then says
"inconclusive at this sample size".

  1. LoRA's energy rank increases with depth;   2. full fine-tuning's does;
  3. full fine-tuning's ‖ΔW‖_F increases with depth (the premise "early layers change little");
  4. LoRA's ‖ΔW‖_F does.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from ..analysis.spectrum import rank_metrics
from ..analysis.stats import mean_interval
from ..training import cell_name
from .deltas import PROJECTIONS, DeltaSVD, full_svds, lora_svds, target_projection
from .types import Answer, StudyRunsView
from .verdicts import num, trend_test, trend_verdict

KEY = "depth"
QUESTION = "How does the needed rank change with depth?"
EXPECTATION = "Early layers, which change little, need lower ranks than later ones."
SOURCE = "a popular write-up's conjecture (not the paper's)"
MEASURES = {"energy_rank_90": "energy rank at 90 %", "effective_rank": "energy effective rank", "norm": "‖ΔW‖_F"}
TESTS = (("lora", "energy_rank_90"), ("full", "energy_rank_90"), ("full", "norm"), ("lora", "norm"))


def module_measures(S: np.ndarray) -> dict[str, float]:
    """The measures of one module's singular values S (see `MEASURES`)."""
    metrics = rank_metrics(S, (0.9,))
    return {"energy_rank_90": metrics.resolved("energy_rank", 0.9), "effective_rank": metrics.resolved("energy_effective_rank"),
            "norm": metrics.frobenius}


def table(svds_by_seed: dict[int, dict[tuple[str, int], DeltaSVD]], projections: list[str]) -> dict[str, Any]:
    """{"layers": [...], projection: {measure: [[value per layer] per seed]}} for the layers every
    seed and projection has."""
    layers = sorted(set.intersection(*({layer for (p, layer) in svds if p in projections} for svds in svds_by_seed.values())))
    out: dict[str, Any] = {"layers": layers, "seeds": list(svds_by_seed)}
    for projection in projections:
        per_seed = [[module_measures(svds[(projection, layer)].S) for layer in layers] for svds in svds_by_seed.values()]
        out[projection] = {m: [[row[m] for row in seed_rows] for seed_rows in per_seed] for m in MEASURES}
    return out


def units(data: dict[str, Any], projections: list[str], measure: str) -> np.ndarray:
    """(seeds × projections, layers): one row per unit of the trend test."""
    return np.array([row for p in projections for row in data[p][measure]], dtype=float)


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    task = config.main_task
    lora_projections = [target_projection(t) for t in config.lora_targets]
    lora = table({seed: lora_svds(runs, task, cell_name(config.depth_rank, seed, list(config.lora_targets)))
                  for seed in config.seeds}, lora_projections)
    full = table({seed: full_svds(runs, task, seed) for seed in config.seeds}, list(PROJECTIONS))
    full_projections = [p for p in PROJECTIONS if p in full]
    methods = {"lora": (lora, lora_projections), "full": (full, full_projections)}
    tests, found = [], []
    for index, (method, measure) in enumerate(TESTS):
        data, projections = methods[method]
        test = trend_test(units(data, projections, measure), seed=index)
        who = f"LoRA r = {config.depth_rank}" if method == "lora" else "full fine-tuning"
        v = trend_verdict(test, MEASURES[measure])
        v.effect = f"{who}, {MEASURES[measure]}: " + v.effect
        found.append(v)
        tests.append({"method": method, "measure": measure} | asdict(test))
    numbers = {"task": task, "seeds": list(config.seeds), "depth_rank": config.depth_rank, "measures": MEASURES,
               "lora": lora | {"projections": lora_projections}, "full": full | {"projections": full_projections},
               "tests": tests}
    measurement = (
        "Mean Spearman ρ between layer and measure over seeds × projections (positive: grows with depth): "
        + "; ".join(f"{'LoRA' if t['method'] == 'lora' else 'full'} {MEASURES[t['measure']]} {num(t['mean_rho'])} "
                    f"(p = {t['p_value']:.2g})" for t in tests)
        + f". {len(lora['layers'])} layers, {len(config.seeds)} seeds.")
    return Answer(KEY, QUESTION, EXPECTATION, SOURCE, measurement, found, numbers, time.perf_counter() - start)


def plot(answer: Answer, figure) -> None:
    """Rows: LoRA r = depth_rank, full fine-tuning; columns: the measures; one line per projection
    type, mean over seeds with its 95 % t interval (bars) per layer."""
    n = answer.numbers
    figure.set_size_inches(6.75, 4.2)
    axes = figure.subplots(2, len(MEASURES), squeeze=False)
    for row, method in enumerate(("lora", "full")):
        data = n[method]
        layers = data["layers"]
        for col, measure in enumerate(MEASURES):
            ax = axes[row][col]
            for index, projection in enumerate(data["projections"]):
                values = np.array(data[projection][measure], dtype=float)  # (seeds, layers)
                mean = values.mean(axis=0)
                if values.shape[0] >= 2:
                    half = np.array([mean_interval(values[:, j]).high - mean[j] for j in range(values.shape[1])])
                    half = np.nan_to_num(half)
                else:
                    half = np.zeros_like(mean)
                ax.errorbar(np.array(layers) + 0.06 * (index - len(data["projections"]) / 2), mean, yerr=half,
                            color=f"C{index}", marker="o", markersize=2.5, linewidth=1, capsize=1.5, label=projection)
            ax.set_xticks(layers)
            ax.tick_params(which="both", labelsize=7)
            ax.set_xlabel("layer", fontsize=7)
            who = f"LoRA r = {n['depth_rank']}" if method == "lora" else "full fine-tuning"
            ax.set_title(f"{who}: {n['measures'][measure]}", fontsize=7)
            if measure == "norm":
                ax.set_yscale("log")
        axes[row][0].legend(fontsize=5.5, ncol=2)
    figure.suptitle(f"Rank and size of ΔW by layer ({n['task']}, seeds {n['seeds']}; bars: 95 % CI over seeds)",
                    fontsize=9)
    figure.tight_layout()
