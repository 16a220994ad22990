"""`StudyConfig`: what `lora-analysis study` trains, measures and renders.

The study answers seven questions beyond the paper's Section 7 (issue 13) on one model and
three built-in tasks. Its runs live where `reproduce` puts its own: one sweep directory per
task, `ReproduceConfig(model, task).run_dir` (e.g. `runs/reproduce-minilm-rotten_tomatoes`),
trained with reproduce's recipe, so cells trained by `reproduce` or `sweep` with that recipe
are reused and a study never retrains them.

The grid (full run; `quick` shrinks seeds, ranks and steps, see `QUICK_GRID`):

    every task       LoRA on `lora_targets` at `ranks` × `seeds`; full fine-tuning × `seeds`
    main task        + LoRA r = `stability_rank` and full fine-tuning over `stability_seeds`
                     + each `target_settings` entry (label, targets, r) × `seeds`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraAnalysisError
from ..reproduce.experiment import ReproduceConfig, default_run_dir

QKVO = ["query", "key", "value", "attention.output.dense"]


@dataclass(frozen=True)
class TargetSetting:
    """One row of question 6: which weights LoRA adapts, at which rank.

    Ranks are chosen so the trainable LoRA parameters per layer match ({q, v} at r = 8 and
    {q, k, v, o} at r = 4 both train 12,288 per MiniLM layer; all linear layers at r = 2
    train 13,824, the closest integer rank); the study reports the exact counts.
    """

    label: str
    targets: list[str] | str
    r: int


# The grid fields left empty take these defaults: the full study's, or a quick run's (a first
# look and the tests: two seeds, the two ranks questions 2, 3 and 5-7 need, 4 steps per cell).
FULL_GRID: dict[str, tuple[int, ...]] = {
    "seeds": (0, 1, 2), "stability_seeds": (0, 1, 2, 3, 4), "ranks": (1, 2, 4, 8, 64),
    "resize_ranks": (1, 2, 4, 8, 16, 32, 64),
}
QUICK_GRID: dict[str, tuple[int, ...]] = {
    "seeds": (0, 1), "stability_seeds": (0, 1), "ranks": (8, 64), "resize_ranks": (1, 8, 64),
}

DEFAULT_TARGET_SETTINGS = (
    TargetSetting("{q, v}", ["query", "value"], 8),
    TargetSetting("{q, k, v, o}", QKVO, 4),
    TargetSetting("all linear", "all-linear", 2),
)


@dataclass
class StudyConfig:
    """The study's plan.

    tasks: built-in data sets; the first is the main task (questions 1-3 and 5-7 use it,
        question 4 uses all). out: figures and README (default `figures/study`, or
        `<runs_root>/study-<model>-quick/figures` for a quick run). runs_root: where the
        per-task sweep directories live (reproduce's default: `runs`).
    seeds: seeds of every cell; stability_seeds: question 5's (≥ 5 for a verdict).
    ranks: LoRA ranks of question 4 (and the rank-k references of question 7).
    compare_ranks: LoRA ranks compared with full fine-tuning in question 2.
    depth_rank / stability_rank: the LoRA rank of questions 3 / 5.
    resize_from / resize_ranks: question 7 resizes rank-`resize_from` adapters to these ranks.
    null_draws: Haar-random draws behind random baselines (default 1000; 200 quick).
    seeds, stability_seeds, ranks, resize_ranks: left empty, they take `FULL_GRID`'s values,
        or `QUICK_GRID`'s for a quick run.
    """

    model: str = "minilm"
    tasks: tuple[str, ...] = ("rotten_tomatoes", "sms_spam", "trec")
    out: Path | None = None
    runs_root: Path = Path("runs")
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    seeds: tuple[int, ...] = ()
    stability_seeds: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    compare_ranks: tuple[int, ...] = (8, 64)
    depth_rank: int = 64
    stability_rank: int = 8
    resize_from: int = 64
    resize_ranks: tuple[int, ...] = ()
    target_settings: tuple[TargetSetting, ...] = DEFAULT_TARGET_SETTINGS
    quick: bool = False
    device: str = "auto"
    progress: bool = True
    null_draws: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        for name, value in (QUICK_GRID if self.quick else FULL_GRID).items():
            setattr(self, name, tuple(getattr(self, name)) or value)
        if not self.tasks:
            raise LoraAnalysisError("the study needs at least one task")
        if len(self.seeds) < 2:
            raise LoraAnalysisError("confidence intervals over seeds need at least two seeds")
        for rank in (*self.compare_ranks, self.depth_rank, self.stability_rank, self.resize_from):
            if rank not in self.ranks:
                raise LoraAnalysisError(f"rank {rank} is used by a question but not in ranks {list(self.ranks)}")
        if self.null_draws is None:
            self.null_draws = 200 if self.quick else 1000
        self.runs_root = Path(self.runs_root)
        if self.out is None:
            self.out = self.study_dir / "figures" if self.quick else Path("figures/study")
        self.out = Path(self.out)

    @property
    def study_dir(self) -> Path:
        """The study's own folder beside the runs (`<runs_root>/study-<model>[-quick]`): its cache
        and, for a quick run, its figures."""
        return self.runs_root / f"study-{Path(self.model).name}{'-quick' if self.quick else ''}"

    @property
    def main_task(self) -> str:
        return self.tasks[0]

    def reproduce_config(self, task: str) -> ReproduceConfig:
        """The sweep of `task`: reproduce's run directory and training recipe (shared runs)."""
        return ReproduceConfig(model=self.model, data=task, quick=self.quick, device=self.device,
                               progress=self.progress,
                               run_dir=default_run_dir(self.model, task, self.quick, self.runs_root))
