"""The records every question of the study returns, and the view of the runs they read.

Each question module exposes `answer(runs: StudyRunsView) -> Answer` (measure + verdict) and
`plot(answer: Answer, figure: matplotlib.figure.Figure) -> None` (draw its figure from
`answer.numbers` alone, so a figure can be redrawn from results.json). The renderer writes
`<out>/<answer.key>.png` and `.pdf`, `results.json` (every `numbers`) and README.md (question,
expectation with its source, measurement, verdict with its rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..adapters import Adapter
from ..training import TrainConfig
from .config import StudyConfig

VerdictText = Literal["holds", "does not hold", "inconclusive at this sample size", "holds trivially under the null"]


@dataclass
class StudyVerdict:
    """verdict: the answer ("holds trivially under the null": the rule passes for random
    matrices too, with probability > α, so it says nothing beyond them); rule: how the numbers decide it (test, side, α, thresholds);
    effect: the measured effect with its 95 % CI and n, in words (one line)."""

    verdict: VerdictText
    rule: str
    effect: str


@dataclass
class Answer:
    """One question's result.

    key: figure and results.json key ("full_ft_spectrum", "lora_vs_full", "depth", "tasks",
        "stability", "targets", "resize_curve"). question / expectation: in words;
        source: where the expectation comes from (the paper's section, or the write-up's
        conjecture). measurement: two sentences for the README with the numbers.
    verdicts: one per claim the question tests (several when it splits, e.g. per task).
    numbers: everything behind the figure, JSON-ready (lists, floats, str keys).
    seconds: wall time spent measuring (not training), for the time record.
    """

    key: str
    question: str
    expectation: str
    source: str
    measurement: str
    verdicts: list[StudyVerdict]
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class StudyRunsView(Protocol):
    """The trained runs as the questions see them (implemented by `study.runs.StudyRuns`).

    Cell names are the sweep's: `training.cell_name(r, seed, targets)` for LoRA cells,
    `f"full-s{seed}"` for full fine-tuning. Every method raises LoraAnalysisError for a cell
    that was not trained.
    """

    config: StudyConfig

    def accuracy(self, task: str, cell: str) -> float:
        """Final validation accuracy of the cell (its metrics.json)."""
        ...

    def cell_dir(self, task: str, cell: str) -> Path:
        """The cell's directory: a PEFT adapter, or a Hugging Face model for full cells."""
        ...

    def adapter(self, task: str, cell: str) -> Adapter:
        """The LoRA cell's adapter (loaded once, cached)."""
        ...

    def recipe(self, task: str) -> TrainConfig:
        """The task's training recipe: evaluates any adapter on the same validation split."""
        ...

    def cache_dir(self) -> Path:
        """A directory for the study's own intermediate files (e.g. resized adapters)."""
        ...
