"""Question 6: which weights should LoRA adapt, at a matched trainable-parameter budget?

On the main task, each of `target_settings` ({q, v} at r = 8, {q, k, v, o} at r = 4, all linear
layers at r = 2 by default) over `seeds`: accuracy mean with its 95 % t interval, and the exact
trainable LoRA parameters read from the trained adapters (A and B of every module; the task
head, trained by every setting alike, is not counted).

The paper's Section 7.1 (Table 5, GPT-3 at 18M parameters) finds that spreading a fixed budget
over more attention matrices beats a larger rank on one: W_q alone (r = 8) 70.4 / 91.0 on
WikiSQL / MultiNLI, {W_q, W_v} (r = 4) 73.7 / 91.3, all four (r = 2) 73.7 / 91.7, seed sd
±0.5 / ±0.1. It does not try layers outside attention; adapting all linear layers is the later
recommendation of QLoRA (Dettmers et al. 2023, Section 4).

Claims: each setting beats every setting listed before it (more matrix types, lower rank, same
budget). Test: Welch's t of each pair's difference (later − earlier), two-sided, p-values
Holm-corrected over all pairs (family-wise α = 0.05):

    holds          adjusted p < α and the later setting's mean is higher
    does not hold  adjusted p < α and it is lower
    inconclusive   adjusted p ≥ α

The effect is the difference with its (unadjusted) 95 % Welch interval.
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

from ..analysis.stats import ALPHA
from ..errors import LoraAnalysisError
from ..plots import LABEL_PT, TEXT_WIDTH, TICK_PT
from ..training import cell_name
from .seeds import draw_seeds, holm, lora_accuracies, summary, welch
from .types import Answer, StudyRunsView, StudyVerdict

KEY = "targets"


def pairwise_verdicts(labels: Sequence[str], accuracies: Sequence[Sequence[float]], alpha: float = ALPHA) -> list[dict]:
    """For each pair i < j: Welch of accuracies[j] − accuracies[i], the Holm-adjusted p over all
    pairs and the verdict on "labels[j] beats labels[i]" (module docstring)."""
    if len(labels) != len(accuracies) or len(labels) < 2:
        raise LoraAnalysisError(f"a comparison needs at least two settings with accuracies, got {len(labels)}")
    pairs = list(itertools.combinations(range(len(labels)), 2))
    tests = [welch(accuracies[i], accuracies[j], alpha) for i, j in pairs]
    adjusted = holm([t.p_value for t in tests])
    rows = []
    for (i, j), test, p in zip(pairs, tests, adjusted):
        if p >= alpha:
            verdict = "inconclusive at this sample size"
        else:
            verdict = "holds" if test.difference > 0 else "does not hold"
        rows.append({"better": labels[j], "than": labels[i], **test.to_dict(), "p_holm": p, "alpha": alpha,
                     "verdict": verdict})
    return rows


def trainable_parameters(runs: StudyRunsView, task: str, cells: Sequence[str]) -> int:
    """The LoRA parameters (A and B of every module) of the cells, which must agree."""
    counts = {runs.adapter(task, cell).num_parameters() for cell in cells}
    if len(counts) != 1:
        raise LoraAnalysisError(f"{task}: the cells {list(cells)} of one setting train different numbers of "
                                f"LoRA parameters {sorted(counts)}")
    return counts.pop()


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    task, seeds = config.main_task, list(config.seeds)
    settings = []
    for setting in config.target_settings:
        cells = [cell_name(setting.r, seed, setting.targets) for seed in seeds]
        settings.append({"label": setting.label, "targets": setting.targets, "r": setting.r,
                         "parameters": trainable_parameters(runs, task, cells),
                         **summary(lora_accuracies(runs, task, setting.r, seeds, setting.targets))})
    pairs = pairwise_verdicts([s["label"] for s in settings], [s["values"] for s in settings])
    numbers = {"task": task, "seeds": seeds, "settings": settings, "pairs": pairs}
    return Answer(
        key=KEY,
        question="Which weights should LoRA adapt, at a matched budget of trainable parameters?",
        expectation="At a fixed budget, adapting more weight types at a lower rank is at least as accurate: "
                    "{W_q, W_v} at r = 4 and all four attention matrices at r = 2 (73.7 / 91.3 and 73.7 / 91.7 on "
                    "WikiSQL / MultiNLI) beat one matrix at r = 8 (W_q: 70.4 / 91.0); all linear layers are not tried.",
        source="the paper's Section 7.1, Table 5 (GPT-3, 18M parameters); all linear layers: QLoRA (Dettmers et al. "
               "2023), Section 4",
        measurement=f"On {task}, mean over {len(seeds)} seeds with 95 % t interval: " + "; ".join(
            f"{s['label']} (r = {s['r']}, {s['parameters']:,} LoRA parameters) {s['mean']:.3f} "
            f"[{s['low']:.3f}, {s['high']:.3f}]" for s in settings) + ".",
        verdicts=[StudyVerdict(
            pair["verdict"],
            f"\"{pair['better']}\" beats \"{pair['than']}\": Welch t, two-sided, Holm-corrected over {len(pairs)} "
            f"pairs, adjusted p < α = {pair['alpha']:g}, sign of the difference",
            f"difference {pair['difference']:+.4f} [95 % Welch interval {pair['low']:+.4f}, {pair['high']:+.4f}], "
            f"p = {pair['p_value']:.3g}, Holm p = {pair['p_holm']:.3g}, n = {len(seeds)} seeds each",
        ) for pair in pairs],
        numbers=numbers,
        seconds=time.perf_counter() - start,
    )


def plot(answer: Answer, figure) -> None:
    """Accuracy per setting: each seed (points), mean with its 95 % t interval; the exact LoRA
    parameter count under each label."""
    numbers = answer.numbers
    settings = numbers["settings"]
    figure.set_size_inches(TEXT_WIDTH / 2, 2.6)
    ax = figure.subplots()
    for i, s in enumerate(settings):
        draw_seeds(ax, i, s, f"C{i}")
    ax.set_xticks(range(len(settings)), [f"{s['label']}\nr = {s['r']}\n{s['parameters']:,} params" for s in settings])
    ax.set_xlim(-0.6, len(settings) - 0.4)
    ax.set_ylabel(f"validation accuracy ({numbers['task']})", fontsize=LABEL_PT)
    ax.set_title(f"dots: {len(numbers['seeds'])} seeds each; squares: mean, 95 % t interval", fontsize=LABEL_PT)
    ax.tick_params(labelsize=TICK_PT)
    figure.set_layout_engine("constrained")
