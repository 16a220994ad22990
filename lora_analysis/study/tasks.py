"""Question 4: does the rank LoRA needs grow with the task's difficulty?

Per task: accuracy of LoRA (on `lora_targets`) at each rank of `ranks`, mean over `seeds` with
its 95 % t interval, beside full fine-tuning's. The rank the task needs is the smallest rank
whose mean accuracy is within one standard error of full fine-tuning's: mean_r − mean_full ≥
−SE, SE = √(s_r²/n_r + s_full²/n_full) the standard error of that difference (Welch's; the two
are independent runs). A task where no rank gets there needs "more than the grid".

Difficulty is full fine-tuning's validation error, 1 − its mean accuracy: what the model cannot
learn even with every weight free, on this recipe. The number of classes would be a proxy that
confounds difficulty with chance level (trec has 6 classes yet may be easier than a 2-class
sentiment task), so it is not used.

The conjecture (a popular write-up's) is a monotone association between difficulty and needed
rank, tested by Kendall's S = Σ_{i<j} sign(d_i − d_j)·sign(r_i − r_j) with its exact one-sided
permutation p-value over all n! pairings of the n tasks' needed ranks (ties as they fall):

    holds          P(S' ≥ S) < α   (harder tasks need higher ranks)
    does not hold  P(S' ≤ S) < α   (they need lower ranks)
    inconclusive   otherwise

With n tasks the smallest attainable p is 1/n!: 1/6 for three tasks, so three tasks can never
give a verdict at α = 0.05 whatever the ranks; the answer then says so.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Sequence

import numpy as np

from ..analysis.stats import ALPHA
from ..errors import LoraAnalysisError
from ..plots import LABEL_PT, TEXT_WIDTH, TICK_PT
from .seeds import full_accuracies, lora_accuracies, summary, welch, within_one_se
from .types import Answer, StudyRunsView, StudyVerdict

KEY = "tasks"
MAX_TASKS = 8  # the exact permutation test enumerates n! pairings


def needed_rank(ranks: Sequence[int], lora: Sequence[Sequence[float]], full: Sequence[float]) -> tuple[int | None, list[dict]]:
    """(the smallest rank within one SE of full fine-tuning, or None; per rank
    {"rank", "difference", "se", "within"}). lora[i]: the accuracies over seeds at ranks[i]."""
    rows: list[dict] = []
    for r, values in zip(ranks, lora):
        w = welch(full, values)
        rows.append({"rank": int(r), "difference": w.difference, "se": w.se, "within": within_one_se(w.difference, w.se)})
    within = sorted(int(row["rank"]) for row in rows if row["within"])
    return (within[0] if within else None), rows


def kendall_s(x: Sequence[float], y: Sequence[float]) -> int:
    """Σ_{i<j} sign(x_i − x_j)·sign(y_i − y_j)."""
    return int(sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in itertools.combinations(range(len(x)), 2)))


def trend_test(difficulty: Sequence[float], ranks: Sequence[float], alpha: float = ALPHA) -> dict:
    """Kendall's S of (difficulty, needed rank) with exact one-sided permutation p-values, τ_a =
    S / C(n, 2), the smallest p any pairing could give (1/n! without ties) and the verdict of the
    module docstring (one task: S = 0, p = 1). A rank beyond the grid is passed as a number above
    every rank."""
    n = len(difficulty)
    if n != len(ranks) or n < 1:
        raise LoraAnalysisError(f"a trend needs tasks with one rank each, got {n} and {len(ranks)}")
    if n > MAX_TASKS:
        raise LoraAnalysisError(f"the exact trend test enumerates n! pairings: at most {MAX_TASKS} tasks, got {n}")
    observed = kendall_s(difficulty, ranks)
    null = np.array([kendall_s(difficulty, perm) for perm in itertools.permutations(ranks)])
    p_greater, p_less = float(np.mean(null >= observed)), float(np.mean(null <= observed))
    smallest = float(min(np.mean(null >= null.max()), np.mean(null <= null.min())))
    if p_greater < alpha:
        verdict = "holds"
    elif p_less < alpha:
        verdict = "does not hold"
    else:
        verdict = "inconclusive at this sample size"
    return {"s": observed, "tau": observed / math.comb(n, 2) if n > 1 else 0.0, "p_greater": p_greater, "p_less": p_less,
            "smallest_p": smallest, "n": n, "alpha": alpha, "verdict": verdict}


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    ranks = sorted(config.ranks)
    tasks: dict[str, dict[str, Any]] = {}
    for task in config.tasks:
        full = full_accuracies(runs, task, config.seeds)
        lora = [lora_accuracies(runs, task, r, config.seeds, config.lora_targets) for r in ranks]
        needed, rows = needed_rank(ranks, lora, full)
        tasks[task] = {"full": summary(full), "lora": [summary(values) | row for values, row in zip(lora, rows)],
                       "needed_rank": needed, "difficulty": 1.0 - float(np.mean(full))}
    beyond = 2 * max(ranks)  # "more than the grid": above every rank, tied among such tasks
    trend = trend_test([t["difficulty"] for t in tasks.values()],
                       [beyond if t["needed_rank"] is None else t["needed_rank"] for t in tasks.values()])
    numbers = {"ranks": ranks, "seeds": list(config.seeds), "targets": config.lora_targets, "tasks": tasks, "trend": trend}
    return Answer(
        key=KEY,
        question="Does the rank LoRA needs grow with the task's difficulty?",
        expectation="Harder tasks need higher ranks: the smallest rank that matches full fine-tuning grows with "
                    "the task's difficulty.",
        source="a popular write-up's conjecture (the paper's Section 7.2 shows r = 1 already suffices on its tasks)",
        measurement=_measurement(tasks),
        verdicts=[StudyVerdict(trend["verdict"], _rule(trend), _effect(tasks, trend))],
        numbers=numbers,
        seconds=time.perf_counter() - start,
    )


def _rank_text(r: int | None, ranks: Sequence[int]) -> str:
    return f"r = {r}" if r is not None else f"more than r = {max(ranks)}"


def _measurement(tasks: dict) -> str:
    parts = [f"{task}: full fine-tuning {t['full']['mean']:.3f} [{t['full']['low']:.3f}, {t['full']['high']:.3f}], "
             f"needs {_rank_text(t['needed_rank'], [row['rank'] for row in t['lora']])}"
             for task, t in tasks.items()]
    return ("Accuracy over seeds (mean, 95 % t interval) and the smallest LoRA rank within one standard error of full "
            "fine-tuning: " + "; ".join(parts) + ".")


def _rule(trend: dict) -> str:
    return (f"Kendall's S between difficulty (full fine-tuning's error) and needed rank over {trend['n']} tasks, exact "
            f"permutation p (one-sided, both directions) < α = {trend['alpha']:g}; the smallest p {trend['n']} tasks can "
            f"give is {trend['smallest_p']:.3g}" + (", so no verdict is possible" if trend["smallest_p"] >= trend["alpha"] else ""))


def _effect(tasks: dict, trend: dict) -> str:
    order = sorted(tasks, key=lambda task: tasks[task]["difficulty"])
    ranks = [row["rank"] for row in next(iter(tasks.values()))["lora"]]
    pairs = ", ".join(f"{task} (error {tasks[task]['difficulty']:.3f}, {_rank_text(tasks[task]['needed_rank'], ranks)})"
                      for task in order)
    return (f"easiest to hardest: {pairs}; Kendall τ = {trend['tau']:.2f}, p(harder needs more) = {trend['p_greater']:.3g}, "
            f"n = {trend['n']} tasks")


def plot(answer: Answer, figure) -> None:
    """One panel per task: mean accuracy with its 95 % t interval vs LoRA rank (log scale),
    full fine-tuning's mean and interval as a line and band, the needed rank marked."""
    numbers = answer.numbers
    tasks = numbers["tasks"]
    figure.set_size_inches(TEXT_WIDTH, 2.8)
    figure.set_layout_engine("constrained")  # before the legend: "outside" places it in the layout
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    n = len(numbers["seeds"])
    for ax, (task, t) in zip(axes, tasks.items()):
        ranks = [row["rank"] for row in t["lora"]]
        means = np.array([row["mean"] for row in t["lora"]])
        errors = np.array([[row["mean"] - row["low"] for row in t["lora"]], [row["high"] - row["mean"] for row in t["lora"]]])
        full = t["full"]
        ax.axhspan(full["low"], full["high"], color="0.85", lw=0)
        ax.axhline(full["mean"], color="0.3", lw=1, label="full fine-tuning (band: 95 % t interval)")
        ax.errorbar(ranks, means, yerr=errors, marker="o", ms=3, lw=1, capsize=2, color="C0", label="LoRA")
        if t["needed_rank"] is not None:
            ax.plot([t["needed_rank"]], [means[ranks.index(t["needed_rank"])]], marker="*", ms=9, color="C3", lw=0,
                    label="needed rank: smallest within 1 SE of full")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        needs = f"r = {t['needed_rank']}" if t["needed_rank"] is not None else f"r > {max(ranks)}"
        ax.set_title(f"{task}: needs {needs}", fontsize=LABEL_PT)
        ax.set_xlabel("LoRA rank r", fontsize=LABEL_PT)
        ax.tick_params(labelsize=TICK_PT)
    axes[0].set_ylabel(f"validation accuracy\n(mean over {n} seeds, 95 % t interval)", fontsize=LABEL_PT)
    handles: dict[str, Any] = {}  # one legend for all panels: the needed-rank star may be in any of them
    for ax in axes:
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels())))
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=len(handles), fontsize=TICK_PT,
                  frameon=False)
