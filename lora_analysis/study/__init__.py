"""`lora-analysis study`: seven questions beyond Section 7, answered with error bars (issue 13).

    from lora_analysis.study import StudyConfig, run_study
    results = run_study(StudyConfig(quick=True))      # trains (or reuses) the grid, writes config.out

See `config` (the grid), `runs` (training and reading the cells), `questions` (the registry of
question modules), `verdicts` (the tests in the study's words) and `render` (figures, README).
"""

from __future__ import annotations

from typing import Any

from .config import StudyConfig, TargetSetting
from .types import Answer, StudyRunsView, StudyVerdict


def run_study(config: StudyConfig, command: str = "lora-analysis study") -> dict[str, Any]:
    """Train (or reuse) the study's runs, answer every question and write `config.out`.

    Refuses (before training) an `out` holding other files of the study's names
    (`render.check_output_dir`; `config.force` overrides). Returns what results.json holds.
    """
    from .questions import QUESTIONS
    from .render import answer_all, check_output_dir, render_all, study_record
    from .runs import train_study

    out = config.out
    assert out is not None  # StudyConfig sets it
    check_output_dir(out, study_record(config), QUESTIONS, config.force)
    runs = train_study(config)
    answers = answer_all(runs, QUESTIONS, progress=config.progress)
    return render_all(runs, answers, QUESTIONS, out, command, progress=config.progress)


__all__ = ["Answer", "StudyConfig", "StudyRunsView", "StudyVerdict", "TargetSetting", "run_study"]
