"""Question 7: how far can a trained adapter be shrunk?

On the main task, each seed's rank-`resize_from` adapter (on `lora_targets`) is resized to every
k of `resize_ranks` by the project's resize (per-module truncated SVD of ΔW, Eckart–Young:
`training.resize_eval.rank_sweep`) and evaluated on the task's validation split (the recipe's,
so the numbers are those of the trained cells' metrics.json). Beside it: adapters trained at
rank k (the k of `ranks`), and the energy kept Σ_{i≤k}σᵢ² / Σσᵢ² over all modules.

Two readings, each with its rule:

* How far: the smallest k whose resized adapters are within one standard error of the
  originals, seed by seed (a resized adapter is derived from its own seed's original, so the
  difference is paired): mean_s(acc_k,s − acc_orig,s) ≥ −SE, SE = sd of those differences / √n.

* "A resized adapter is as accurate as one trained at that rank" (each k < resize_from in both
  grids): an equivalence test (two one-sided Welch tests at α = 0.05, i.e. the 90 % Welch
  interval of resized − trained) with the margin `EQUIVALENCE_MARGIN` (one accuracy point):

      holds          the 90 % interval lies inside (−margin, margin)
      does not hold  it lies entirely outside [−margin, margin]
      inconclusive   otherwise

Resizing and evaluation are cached in `runs.cache_dir()/resize_curve/<task>/<cell>.json`, keyed
by the adapter files' SHA-256, the recipe's evaluation fields and the device type (bf16 autocast on CUDA changes the
numbers), so a re-run evaluates only the ranks it has not seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..analysis.stats import ALPHA
from ..devices import resolve_device
from ..errors import LoraAnalysisError
from ..fileio import atomic_write_text, read_json
from ..plots import LABEL_PT, TEXT_WIDTH, TICK_PT
from ..training import cell_name
from .seeds import lora_accuracies, paired_difference, summary, welch, within_one_se
from .types import Answer, StudyRunsView, StudyVerdict

KEY = "resize_curve"
EQUIVALENCE_MARGIN = 0.01  # one accuracy point: about one seed-to-seed sd on the built-in tasks
CACHE_FORMAT = "lora_analysis.study.resize_curve/1"
# What `evaluate` reads of a recipe (the base model, the data and its validation split, the
# batches): the cache key, so runtime fields (progress, output_dir, ...) do not invalidate it.
EVALUATION_FIELDS = ("model", "task", "data", "text_column", "label_column", "labels", "val_fraction", "split_seed",
                     "max_seq_len", "eval_batch_size")


def equivalence(resized: Sequence[float], trained: Sequence[float], margin: float = EQUIVALENCE_MARGIN,
                alpha: float = ALPHA) -> dict:
    """The TOST of resized − trained against ±margin (module docstring): Welch's difference with
    its (1 − 2α) interval, and the verdict."""
    if not margin > 0:
        raise LoraAnalysisError(f"the equivalence margin must be > 0, got {margin}")
    w = welch(trained, resized, 2.0 * alpha)
    if -margin < w.low and w.high < margin:
        verdict = "holds"
    elif w.low > margin or w.high < -margin:
        verdict = "does not hold"
    else:
        verdict = "inconclusive at this sample size"
    return {"difference": w.difference, "se": w.se, "df": w.df, "low": w.low, "high": w.high,
            "level": 1.0 - 2.0 * alpha, "margin": margin, "verdict": verdict}


def smallest_within(ranks: Sequence[int], original: Sequence[float], resized: Sequence[Sequence[float]]) -> tuple[int | None, list[dict]]:
    """(the smallest k whose resized accuracies are within one paired SE of the originals, or
    None; per k {"rank", "difference", "se", "within"}). resized[i]: accuracies over the same
    seeds as `original`, at ranks[i]."""
    rows: list[dict] = []
    for k, values in zip(ranks, resized):
        difference, se = paired_difference(original, values)
        rows.append({"rank": int(k), "difference": difference, "se": se, "within": within_one_se(difference, se)})
    within = sorted(int(row["rank"]) for row in rows if row["within"])
    return (within[0] if within else None), rows


def resized_points(runs: StudyRunsView, task: str, cell: str, ranks: Sequence[int]) -> dict[int, dict]:
    """{k: {"accuracy", "energy_kept", "relative_error", "examples"}} of the cell's adapter
    resized to rank k and evaluated on the task's validation split, from the cache where it
    holds them."""
    from ..training.resize_eval import rank_sweep

    config = runs.config
    recipe = runs.recipe(task)
    path = Path(runs.cache_dir()) / "resize_curve" / task / f"{cell}.json"
    key = _fingerprint(runs.cell_dir(task, cell), recipe, resolve_device(config.device).type)
    cached = _read_cache(path, key)
    missing = [k for k in ranks if str(k) not in cached]
    if missing:
        points = rank_sweep(runs.adapter(task, cell), missing, recipe=recipe, device=config.device,
                            progress=config.progress)
        for point in points:
            if point.evaluation is None or point.evaluation.accuracy is None:
                raise LoraAnalysisError(f"{task}: {cell} resized to rank {point.rank} has no validation accuracy "
                                        "(the study's tasks are classification)")
            cached[str(point.rank)] = {"accuracy": point.evaluation.accuracy, "energy_kept": point.result.energy_kept,
                                       "relative_error": point.result.relative_error,
                                       "examples": point.evaluation.examples}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "key": key, "points": cached}, indent=1, allow_nan=False))
    return {int(k): cached[str(k)] for k in ranks}


def _fingerprint(cell_dir: Path, recipe, device_type: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(p.name for p in Path(cell_dir).iterdir() if p.name.startswith("adapter_")):
        digest.update(name.encode() + b"\0" + (Path(cell_dir) / name).read_bytes())
    fields = dataclasses.asdict(recipe)
    recipe_text = json.dumps({name: fields[name] for name in EVALUATION_FIELDS}, sort_keys=True, default=str)
    digest.update(recipe_text.encode() + b"\0" + device_type.encode())
    return digest.hexdigest()


def _read_cache(path: Path, key: str) -> dict:
    """The cached points of `path` when it was written for `key`, else none (stale: recomputed)."""
    if not path.is_file():
        return {}
    data = read_json(path, "study cache")
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
        return {}
    return dict(data["points"])


def answer(runs: StudyRunsView) -> Answer:
    start = time.perf_counter()
    config = runs.config
    task, seeds, source = config.main_task, list(config.seeds), config.resize_from
    ks = sorted(config.resize_ranks)
    per_seed = [resized_points(runs, task, cell_name(source, seed, config.lora_targets), ks) for seed in seeds]
    original = lora_accuracies(runs, task, source, seeds, config.lora_targets)
    resized_accuracies = [[points[k]["accuracy"] for points in per_seed] for k in ks]
    smallest, rows = smallest_within(ks, original, resized_accuracies)
    resized = [{"rank": k, **summary(values), **row, "energy_kept": [points[k]["energy_kept"] for points in per_seed],
                "mean_energy_kept": float(np.mean([points[k]["energy_kept"] for points in per_seed]))}
               for k, values, row in zip(ks, resized_accuracies, rows)]
    trained_ranks = [k for k in ks if k in config.ranks and k < source]
    trained = [{"rank": k, **summary(lora_accuracies(runs, task, k, seeds, config.lora_targets))} for k in trained_ranks]
    by_rank = {row["rank"]: row for row in resized}
    tests = [{"rank": t["rank"], **equivalence(by_rank[t["rank"]]["values"], t["values"])} for t in trained]
    numbers = {"task": task, "seeds": seeds, "targets": config.lora_targets, "resize_from": source,
               "original": summary(original), "resized": resized, "trained": trained, "equivalence": tests,
               "smallest_rank": smallest}
    return Answer(
        key=KEY,
        question=f"How far can a trained adapter be shrunk? (rank {source} resized to k)",
        expectation="Truncating ΔW to its top-k singular directions keeps the accuracy down to a small k, and a "
                    "resized adapter is as accurate as one trained at rank k.",
        source="the paper's Section 7.2 (the top directions of r = 8 and r = 64 adapters agree; r = 1 suffices on "
               "its tasks) and the resize tools built on it (kohya's resize_lora)",
        measurement=_measurement(numbers),
        verdicts=_verdicts(tests, len(seeds)),
        numbers=numbers,
        seconds=time.perf_counter() - start,
    )


def _verdicts(tests: list[dict], n: int) -> list[StudyVerdict]:
    """One per rank trained below the source rank; without such a rank the claim is untested."""
    if not tests:
        return [StudyVerdict("inconclusive at this sample size", "no rank below the resized adapters' was trained",
                             "no comparison: n = 0 ranks")]
    return [StudyVerdict(
        t["verdict"],
        f"equivalence of resized and trained-at-k accuracy: the {t['level'] * 100:.0f} % Welch interval of the difference "
        f"inside ±{t['margin']:g} (two one-sided tests at α = {ALPHA:g}); entirely outside: does not hold",
        f"k = {t['rank']}: resized − trained = {t['difference']:+.4f} [{t['level'] * 100:.0f} % interval {t['low']:+.4f}, "
        f"{t['high']:+.4f}], n = {n} seeds each",
    ) for t in tests]


def _measurement(numbers: dict) -> str:
    source, original = numbers["resize_from"], numbers["original"]
    smallest = numbers["smallest_rank"]
    row = next((r for r in numbers["resized"] if r["rank"] == smallest), None)
    how_far = (f"down to k = {smallest} ({row['mean']:.3f}, energy kept {row['mean_energy_kept']:.3f})" if row
               else "to no rank of the grid")
    return (f"The rank-{source} adapters ({original['mean']:.3f} [{original['low']:.3f}, {original['high']:.3f}], mean "
            f"over {original['n']} seeds, 95 % t interval) keep their accuracy within one paired standard error {how_far}. "
            "Resized vs trained at the same rank: " + "; ".join(
                f"k = {t['rank']} {t['difference']:+.4f} ({t['verdict']})" for t in numbers["equivalence"]) + ".")


def plot(answer: Answer, figure) -> None:
    """Left: accuracy vs k (log scale) of the resized adapters and of adapters trained at k (mean
    over seeds, 95 % t interval), the originals as a line and band. Right: energy kept vs k."""
    numbers = answer.numbers
    figure.set_size_inches(TEXT_WIDTH, 2.6)
    left, right = figure.subplots(1, 2)
    resized, trained, original = numbers["resized"], numbers["trained"], numbers["original"]
    n = len(numbers["seeds"])
    ks = [row["rank"] for row in resized]
    left.axhspan(original["low"], original["high"], color="0.85", lw=0)
    left.axhline(original["mean"], color="0.3", lw=1, label=f"original r = {numbers['resize_from']}")
    _errorbar(left, resized, "C0", "o", f"resized from r = {numbers['resize_from']}")
    if trained:  # drawn a little to the right of the resized points at the same k
        _errorbar(left, trained, "C1", "s", "trained at r = k", shift=1.1)
    if numbers["smallest_rank"] is not None:
        row = next(r for r in resized if r["rank"] == numbers["smallest_rank"])
        left.plot([row["rank"]], [row["mean"]], "*", ms=9, color="C3", label="smallest k within 1 paired SE")
    left.set_ylabel(f"validation accuracy ({numbers['task']})\nmean over {n} seeds, 95 % t interval", fontsize=LABEL_PT)
    left.legend(fontsize=TICK_PT, frameon=False, loc="lower right")
    for row in resized:
        right.plot(np.full(len(row["energy_kept"]), row["rank"]), row["energy_kept"], "o", ms=2.5, color="C0", alpha=0.6)
    right.plot(ks, [row["mean_energy_kept"] for row in resized], "-", lw=1, color="C0")
    right.set_ylabel("energy kept $\\Sigma_{i \\leq k}\\,\\sigma_i^2 \\,/\\, \\Sigma_i\\,\\sigma_i^2$\n"
                     f"(each seed; line: mean over {n})", fontsize=LABEL_PT)
    lowest = min(min(row["energy_kept"]) for row in resized)
    right.set_ylim(lowest - 0.05 * (1.0 - lowest) - 1e-3, 1.0 + 0.05 * (1.0 - lowest) + 1e-3)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("rank k", fontsize=LABEL_PT)
        ax.tick_params(labelsize=TICK_PT)
    figure.set_layout_engine("constrained")


def _errorbar(ax, rows: list[dict], color: str, marker: str, label: str, shift: float = 1.0) -> None:
    means = np.array([row["mean"] for row in rows])
    errors = np.array([[row["mean"] - row["low"] for row in rows], [row["high"] - row["mean"] for row in rows]])
    ax.errorbar([row["rank"] * shift for row in rows], means, yerr=errors, marker=marker, ms=3, lw=1, capsize=2, color=color,
                label=label)
