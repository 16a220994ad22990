"""Render the study: one figure per question (PNG + PDF), results.json and a generated README.md.

    <out>/<key>.png, <out>/<key>.pdf   each question's figure, drawn from its `Answer.numbers`
    <out>/results.json                 every Answer (numbers, verdicts, rule), the study record and
                                       the time record; strict JSON (non-finite numbers → null,
                                       with `null_reasons`)
    <out>/README.md                    per question: the question, the expectation with its source,
                                       the measurement, the verdicts with their rules, the figure;
                                       then where the time went

Output rules as `outputs.check_results_dir` (shared with `reproduce`): `out` may be new, empty, or a previous study
of the same model and tasks (its files are replaced; a full study only by another full one);
anything else holding files of the study's names is refused unless `force`.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..errors import LoraAnalysisError
from ..fileio import atomic_write_text, dumps_json, read_json
from ..outputs import check_results_dir
from ..report.build import json_ready
from ..report.tables import markdown_table
from .config import StudyConfig
from .runs import StudyRuns
from .types import Answer

WRITTEN_FORMATS = ("png", "pdf")
RESULT_FILES = ("results.json", "README.md")
RESULTS_FORMAT = "lora_analysis.study/1"
SIGNIFICANT_DIGITS = 6  # float32 analyses: digits beyond these move with the BLAS thread count


def output_files(questions: Sequence[ModuleType]) -> list[str]:
    """Every file name the study writes into `out`."""
    return [f"{q.KEY}.{fmt}" for q in questions for fmt in WRITTEN_FORMATS] + list(RESULT_FILES)


def study_record(config: StudyConfig) -> dict[str, Any]:
    """What `check_output_dir` compares: the study a config writes."""
    return {"model": str(config.model), "tasks": list(config.tasks), "quick": config.quick}


def check_output_dir(out: Path, record: dict[str, Any], questions: Sequence[ModuleType], force: bool = False) -> None:
    """Refuse, before any work, to write over files the study did not write (see the module doc)."""
    check_results_dir(out, record, _previous_study, output_files(questions), "study", force)


def _previous_study(out: Path) -> dict[str, Any] | None:
    """The "study" record of `out/results.json` when a study wrote it, else None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        results = read_json(path, "study results")
    except LoraAnalysisError:
        return None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT or not isinstance(results.get("study"), dict):
        return None
    return results["study"]


def answer_all(runs: StudyRuns, questions: Sequence[ModuleType], progress: bool = True) -> list[Answer]:
    """Every question's Answer, in order; `seconds` is the wall time of each measurement."""
    answers = []
    for question in tqdm(questions, desc="questions", unit="question", disable=not progress):
        start = time.perf_counter()
        found = question.answer(runs)
        found.seconds = time.perf_counter() - start
        answers.append(found)
    return answers


def render_all(runs: StudyRuns, answers: list[Answer], questions: Sequence[ModuleType], out: Path, command: str,
               progress: bool = True) -> dict[str, Any]:
    """Write every figure, results.json and README.md into `out` (created); returns the results."""
    from matplotlib.figure import Figure

    from ..plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    by_key = {q.KEY: q for q in questions}
    for found in tqdm(answers, desc="figures", unit="figure", disable=not progress):
        figure = Figure(dpi=300)
        by_key[found.key].plot(found, figure)
        for fmt in WRITTEN_FORMATS:
            save_figure(figure, out / f"{found.key}.{fmt}")
    rendering = time.perf_counter() - start
    results = results_record(runs, answers, command, rendering)
    atomic_write_text(out / "results.json", dumps_json(results, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "README.md", readme(results))
    return results


def results_record(runs: StudyRuns, answers: list[Answer], command: str, rendering_s: float) -> dict[str, Any]:
    """results.json: the study record, every Answer, the time record (strict JSON, 6 digits)."""
    config = runs.config
    train = runs.recipe(config.main_task)
    study = study_record(config) | {
        "command": command, "seeds": list(config.seeds), "stability_seeds": list(config.stability_seeds),
        "ranks": list(config.ranks), "lora_targets": list(config.lora_targets), "null_draws": config.null_draws,
        "steps": train.steps, "batch_size": train.batch_size, "lr": train.learning_rate,
        "runs": {task: str(config.reproduce_config(task).run_dir) for task in config.tasks},
    }
    questions = {a.key: {"number": i, "question": a.question, "expectation": a.expectation, "source": a.source,
                         "measurement": a.measurement, "verdicts": [vars(v) for v in a.verdicts],
                         "numbers": a.numbers, "seconds": a.seconds}
                 for i, a in enumerate(answers, start=1)}
    record = {"format": RESULTS_FORMAT, "study": study, "questions": questions,
              "time": time_record(runs, answers, rendering_s)}
    return json_ready(_significant(record))


def time_record(runs: StudyRuns, answers: list[Answer], rendering_s: float) -> dict[str, Any]:
    """Where the time went: training per cell (manifests' wall times; trained now or reused),
    this invocation's training wall time, measurement per question, rendering."""
    cells = [{"task": r.task, "cell": r.cell, "wall_time_s": r.wall_time_s, "trained_now": r.trained_now}
             for r in runs.records]
    return {
        "cells": cells,
        "training_s_trained_now": sum(c["wall_time_s"] for c in cells if c["trained_now"]),
        "training_s_reused": sum(c["wall_time_s"] for c in cells if not c["trained_now"]),
        "cells_trained_now": sum(1 for c in cells if c["trained_now"]),
        "cells_reused": sum(1 for c in cells if not c["trained_now"]),
        "training_wall_s": runs.training_seconds,
        "measurement_s": {a.key: a.seconds for a in answers},
        "rendering_s": rendering_s,
    }


def _significant(x: Any) -> Any:
    """Floats rounded to `SIGNIFICANT_DIGITS` (same inputs give identical files), recursively;
    tuples become lists, keys strings."""
    if isinstance(x, dict):
        return {str(k): _significant(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_significant(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    try:
        value = float(x)
    except (TypeError, ValueError):
        return x
    if hasattr(x, "dtype") and getattr(x, "dtype").kind in "iu":
        return int(x)
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if value == value and abs(value) != float("inf") else value


def readme(results: dict[str, Any]) -> str:
    """The generated README.md of the output folder (from results.json alone)."""
    study = results["study"]
    lines = [
        "# Beyond Section 7: LoRA's rank, measured",
        "",
        f"Generated by `{study['command']}`: {study['model']} on {', '.join(study['tasks'])} (main task "
        f"{study['tasks'][0]}), LoRA on {{{', '.join(study['lora_targets'])}}} at ranks {study['ranks']}, full "
        f"fine-tuning, seeds {study['seeds']} ({study['steps']} steps of batch {study['batch_size']}). Intervals are 95 % "
        f"(order-statistic intervals of medians over units, Student t over seeds); every verdict names its rule.",
        "",
    ]
    if study["quick"]:
        lines += [f"**Quick run ({study['steps']} steps per cell): these runs are barely trained, so the verdicts describe "
                  f"them, not the questions. Run without `--quick` for those.**", ""]
    for key, q in in_order(results):
        lines += [f"## {q['number']}. {q['question']} (`{key}`)", "",
                  f"**Expectation** ({q['source']}): {q['expectation']}", "",
                  f"**Measurement:** {q['measurement']}", "", "**Verdicts:**", ""]
        lines += [f"- **{v['verdict']}** — {v['effect']}. *Rule:* {v['rule']}." for v in q["verdicts"]]
        lines += ["", f"![{key}]({key}.png)", ""]
    lines += time_section(results["time"])
    return "\n".join(lines) + "\n"


def in_order(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """results.json's questions by number (the file sorts its keys)."""
    return sorted(results["questions"].items(), key=lambda item: item[1]["number"])


def summary(results: dict[str, Any], figures: str = "figures/study") -> str:
    """The project README's section body: per question its figure, measurement and verdicts
    (images under `figures`), from results.json alone."""
    lines = []
    for key, q in in_order(results):
        lines += [f"**{q['number']}. {q['question']}** (`{key}`; expectation, from {q['source']}: {q['expectation']})",
                  "", f"![{key}]({figures}/{key}.png)", "", q["measurement"], ""]
        lines += [f"- {v['verdict']}: {v['effect']}" for v in q["verdicts"]]
        lines.append("")
    return "\n".join(lines)


def time_section(time_record_: dict[str, Any]) -> list[str]:
    t = time_record_
    rows = [["training, cells trained by this run", f"{t['cells_trained_now']}", f"{t['training_s_trained_now']:.0f}"],
            ["training, cells reused (their original time)", f"{t['cells_reused']}", f"{t['training_s_reused']:.0f}"],
            *([f"measurement: {key}", "", f"{seconds:.1f}"] for key, seconds in t["measurement_s"].items()),
            ["rendering figures", "", f"{t['rendering_s']:.1f}"]]
    return ["## Where the time went", "",
            f"Training wall time of this invocation (including checks of reused cells): {t['training_wall_s']:.0f} s. "
            f"Per-cell times are in `results.json` (`time.cells`).", "",
            markdown_table(["step", "cells", "seconds"], rows), ""]
