"""The study's questions, in the order the figures and the README number them (1..7).

Each is a module with `KEY`, `answer(runs: StudyRunsView) -> Answer` and
`plot(answer: Answer, figure: matplotlib.figure.Figure) -> None` (see `types`).
"""

from __future__ import annotations

from types import ModuleType

from . import depth, full_ft_spectrum, lora_vs_full, resize_curve, stability, targets, tasks

QUESTIONS: tuple[ModuleType, ...] = (full_ft_spectrum, lora_vs_full, depth, tasks, stability, targets, resize_curve)
