"""The study's trained runs: `train_study` trains (or reuses) the grid, `StudyRuns` reads it.

Each task's cells live in reproduce's sweep directory for that task
(`StudyConfig.reproduce_config(task).run_dir`), trained with reproduce's recipe, so a cell that
`reproduce` or `sweep` already trained is reused as it is, and an interrupted study resumes.
The grid (`StudyConfig`'s docstring) is made of a few rectangular sweeps per task, each one a
`run_sweep` call into the same run directory (its manifest keeps every cell it ever trained).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import Adapter, load_adapter
from ..errors import LoraAnalysisError
from ..fileio import read_json
from ..training import TrainConfig, cell_name, full_cell_name, run_sweep
from ..training.models import resolve_model
from ..training.output_dir import looks_finished
from ..training.sweep import FULL
from .config import StudyConfig


@dataclass(frozen=True)
class SweepPlan:
    """One rectangular `run_sweep` call: LoRA on `target_sets` × `ranks` × `seeds` (none when
    `ranks` is empty) and, with `full`, full fine-tuning × `seeds`."""

    ranks: tuple[int, ...]
    seeds: tuple[int, ...]
    target_sets: tuple[list[str] | str, ...]
    full: bool

    @property
    def methods(self) -> tuple[str, ...]:
        return (("lora",) if self.ranks else ()) + ((FULL,) if self.full else ())


def sweep_plans(config: StudyConfig, task: str) -> list[SweepPlan]:
    """The sweeps of `task` (see `StudyConfig`): every task's grid, and on the main task the
    stability seeds and the target settings."""
    plans = [SweepPlan(config.ranks, config.seeds, (list(config.lora_targets),), True)]
    if task == config.main_task:
        extra_seeds = tuple(s for s in config.stability_seeds if s not in config.seeds)
        if extra_seeds:
            plans.append(SweepPlan((config.stability_rank,), extra_seeds, (list(config.lora_targets),), True))
        for setting in config.target_settings:
            targets = setting.targets if isinstance(setting.targets, str) else list(setting.targets)
            if targets == list(config.lora_targets) and setting.r in config.ranks:
                continue  # already in the task's grid
            plans.append(SweepPlan((setting.r,), config.seeds, (targets,), False))
    return plans


@dataclass
class CellRecord:
    """Training time of one cell, for the time record: `trained_now` False when it was reused."""

    task: str
    cell: str
    wall_time_s: float
    trained_now: bool


@dataclass
class StudyRuns:
    """The trained grid (implements `types.StudyRunsView`).

    cells: task → cell name → directory; records: every cell's training time (manifests);
    training_seconds: wall time `train_study` spent (training and checks, this invocation).
    """

    config: StudyConfig
    cells: dict[str, dict[str, Path]]
    records: list[CellRecord] = field(default_factory=list)
    training_seconds: float = 0.0
    _adapters: dict[tuple[str, str], Adapter] = field(default_factory=dict, repr=False)

    def cell_dir(self, task: str, cell: str) -> Path:
        try:
            return self.cells[task][cell]
        except KeyError:
            raise LoraAnalysisError(f"the study has no cell {cell!r} for task {task!r} (not in its grid)") from None

    def metrics(self, task: str, cell: str) -> dict[str, Any]:
        """The cell's metrics.json."""
        metrics = read_json(self.cell_dir(task, cell) / "metrics.json", "training metrics")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("final"), dict):
            raise LoraAnalysisError(f"{self.cell_dir(task, cell)}/metrics.json: no final evaluation")
        return metrics

    def accuracy(self, task: str, cell: str) -> float:
        value = self.metrics(task, cell)["final"].get("val_accuracy")
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise LoraAnalysisError(f"{self.cell_dir(task, cell)}/metrics.json: final val_accuracy is not in [0, 1]")
        return float(value)

    def adapter(self, task: str, cell: str) -> Adapter:
        if cell.startswith(FULL):
            raise LoraAnalysisError(f"{cell} is a full fine-tuning cell, not an adapter (its ΔW: study.deltas.full_svds)")
        key = (task, cell)
        if key not in self._adapters:
            self._adapters[key] = load_adapter(self.cell_dir(task, cell))
        return self._adapters[key]

    def recipe(self, task: str) -> TrainConfig:
        return self.config.reproduce_config(task).train_config()

    def cache_dir(self) -> Path:
        path = self.config.study_dir / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def base_model_dir(self) -> Path:
        """The pretrained model's directory (W₀ of every cell)."""
        return resolve_model(self.config.model)[0]


def train_study(config: StudyConfig) -> StudyRuns:
    """Train the grid's missing cells (finished ones reused, unfinished resumed); see the module doc."""
    resolve_model(config.model)  # a bad model fails here, before any progress output
    start = time.perf_counter()
    cells: dict[str, dict[str, Path]] = {}
    records: list[CellRecord] = []
    for task in config.tasks:
        run_dir = config.reproduce_config(task).run_dir
        assert run_dir is not None  # ReproduceConfig sets it
        base = config.reproduce_config(task).train_config()
        cells[task] = {}
        for plan in sweep_plans(config, task):
            names = _plan_cells(plan)
            finished_before = {name for name in names if looks_finished(run_dir / name)}
            result = run_sweep(base, run_dir, plan.ranks, plan.seeds, list(plan.target_sets), plan.methods)
            cells[task].update(result.cells)
            for name in result.cells:
                wall = result.manifest["cells"][name].get("wall_time_s")
                records.append(CellRecord(task, name, float(wall) if isinstance(wall, (int, float)) else 0.0,
                                          name not in finished_before))
    return StudyRuns(config, cells, records, time.perf_counter() - start)


def _plan_cells(plan: SweepPlan) -> list[str]:
    lora = [cell_name(r, seed, targets) for targets in plan.target_sets for r in plan.ranks for seed in plan.seeds]
    return lora + ([full_cell_name(seed) for seed in plan.seeds] if plan.full else [])
