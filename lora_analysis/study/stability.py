"""Question 5: is LoRA more stable across seeds than full fine-tuning?

On the main task: final validation accuracy of LoRA (r = `stability_rank`, on `lora_targets`)
and of full fine-tuning over `stability_seeds`. The write-ups' claim is that LoRA's accuracy
varies less from seed to seed.

Test (the verdict): Brown–Forsythe, i.e. Levene's test with center = median (scipy), two-sided
at α = 0.05: an ANOVA of z = |x − median of its group|, robust to the outlying seed that
training runs produce (a collapsed run) where the F test of variances is not. Direction: which
group has the larger mean z.

    holds          p < α and full fine-tuning's mean z > LoRA's
    does not hold  p < α and LoRA's mean z > full fine-tuning's
    inconclusive   p ≥ α

Effect: the variance ratio s²_full / s²_LoRA with its normal-theory interval
[R / F_{1−α/2}(n_f − 1, n_l − 1), R / F_{α/2}(n_f − 1, n_l − 1)]. With 5 seeds each the F test
only sees ratios beyond F_{0.975}(4, 4) ≈ 9.6: equal variances are not shown by a p ≥ α.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..analysis.stats import ALPHA
from ..errors import LoraAnalysisError
from ..plots import LABEL_PT, TEXT_WIDTH, TICK_PT
from .seeds import draw_seeds, full_accuracies, lora_accuracies, summary
from .types import Answer, StudyRunsView, StudyVerdict

KEY = "stability"


def equal_variance_test(lora: Sequence[float], full: Sequence[float], alpha: float = ALPHA) -> dict:
    """Brown–Forsythe and the variance ratio of `full` over `lora` (each ≥ 2 finite values), with
    the verdict of the module docstring. Undefined quantities are None, never NaN: the ratio and
    its interval when LoRA's variance is 0; the test when |x − median| is constant within each
    group (always so with two seeds: the ANOVA of z has no within-group spread), then
    inconclusive."""
    from scipy import stats

    x, y = np.asarray(lora, dtype=float), np.asarray(full, dtype=float)
    if x.size < 2 or y.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise LoraAnalysisError(f"a test of equal variance needs at least two finite values per group, got {x.tolist()} "
                                f"and {y.tolist()}")
    z_lora, z_full = np.abs(x - np.median(x)), np.abs(y - np.median(y))
    if np.all(z_lora == z_lora[0]) and np.all(z_full == z_full[0]):  # always so with 2 seeds: scipy gives 0/0 or ∞
        statistic = p_value = None
    else:
        result = stats.levene(x, y, center="median")
        statistic, p_value = float(result.statistic), float(result.pvalue)
    var_lora, var_full = float(x.var(ddof=1)), float(y.var(ddof=1))
    ratio = low = high = None
    if var_lora > 0.0:
        ratio = var_full / var_lora
        low = ratio / float(stats.f.ppf(1.0 - alpha / 2.0, y.size - 1, x.size - 1))
        high = ratio / float(stats.f.ppf(alpha / 2.0, y.size - 1, x.size - 1))
    if p_value is None or p_value >= alpha:
        verdict = "inconclusive at this sample size"
    else:
        verdict = "holds" if z_full.mean() > z_lora.mean() else "does not hold"
    return {"statistic": statistic, "p_value": p_value, "mean_abs_dev_lora": float(z_lora.mean()),
            "mean_abs_dev_full": float(z_full.mean()), "sd_lora": float(np.sqrt(var_lora)), "sd_full": float(np.sqrt(var_full)),
            "variance_ratio": ratio, "ratio_low": low, "ratio_high": high,
            "detectable_ratio": float(stats.f.ppf(1.0 - alpha / 2.0, y.size - 1, x.size - 1)),
            "n_lora": int(x.size), "n_full": int(y.size), "alpha": alpha, "verdict": verdict}


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    task, seeds, r = config.main_task, list(config.stability_seeds), config.stability_rank
    lora = lora_accuracies(runs, task, r, seeds, config.lora_targets)
    full = full_accuracies(runs, task, seeds)
    test = equal_variance_test(lora, full)
    numbers: dict[str, Any] = {"task": task, "rank": r, "targets": config.lora_targets, "seeds": seeds, "lora": summary(lora),
               "full": summary(full), "test": test}
    return Answer(
        key=KEY,
        question="Is LoRA more stable across seeds than full fine-tuning?",
        expectation="LoRA's accuracy varies less from seed to seed than full fine-tuning's.",
        source="the popular write-ups' claim (not a claim of the paper)",
        measurement=(f"On {task} over {len(seeds)} seeds: LoRA r = {r} {numbers['lora']['mean']:.3f} ± sd "
                     f"{test['sd_lora']:.4f}, full fine-tuning {numbers['full']['mean']:.3f} ± sd {test['sd_full']:.4f}. "
                     f"Variance ratio full / LoRA {_ratio_text(test)}."),
        verdicts=[StudyVerdict(
            test["verdict"],
            f"Brown–Forsythe (Levene, center = median) two-sided p < α = {test['alpha']:g}, direction from the mean "
            f"absolute deviation from each group's median; the F interval of the variance ratio is the effect's size "
            f"(with {test['n_full']} and {test['n_lora']} seeds it excludes 1 only beyond a ratio of "
            f"{test['detectable_ratio']:.3g})",
            f"s²_full / s²_LoRA = {_ratio_text(test)}, Brown–Forsythe W = {_statistic_text(test)}, p = {_p_text(test)}, "
            f"n = {test['n_full']} + {test['n_lora']} seeds",
        )],
        numbers=numbers,
        seconds=time.perf_counter() - start,
    )


def _statistic_text(test: dict) -> str:
    return "undefined (no spread of |x − median| within groups)" if test["statistic"] is None else f"{test['statistic']:.3g}"


def _p_text(test: dict) -> str:
    return "undefined" if test["p_value"] is None else f"{test['p_value']:.3g}"


def _ratio_text(test: dict) -> str:
    if test["variance_ratio"] is None:
        return "undefined (LoRA's accuracy is the same for every seed)"
    return f"{test['variance_ratio']:.3g} [95 % F interval {test['ratio_low']:.3g}, {test['ratio_high']:.3g}]"


def plot(answer: Answer, figure) -> None:
    """Each seed's accuracy (points) for LoRA and full fine-tuning, with the mean and its 95 % t
    interval beside them."""
    numbers = answer.numbers
    figure.set_size_inches(TEXT_WIDTH / 2, 2.6)
    ax = figure.subplots()
    groups = [(f"LoRA r = {numbers['rank']}", numbers["lora"]), ("full fine-tuning", numbers["full"])]
    for i, (_, group) in enumerate(groups):
        draw_seeds(ax, i, group, f"C{i}")
    ax.set_xticks([0, 1], [label for label, _ in groups])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel(f"validation accuracy ({numbers['task']})", fontsize=LABEL_PT)
    test = numbers["test"]
    ax.set_title(f"dots: {len(numbers['seeds'])} seeds each; squares: mean, 95 % t interval\n"
                 f"Brown–Forsythe p = {_p_text(test)}", fontsize=LABEL_PT)
    ax.tick_params(labelsize=TICK_PT)
    figure.set_layout_engine("constrained")
