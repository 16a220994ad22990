"""`TrainConfig`: everything one training run needs, as one flat dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ALL_LINEAR, from_known_fields
from ..errors import LoraAnalysisError
from .data import TASKS

# Fields that do not change the trained adapter: they may differ when a run is resumed.
RUNTIME_FIELDS = frozenset(
    {"output_dir", "resume", "overwrite", "progress", "device", "eval_every", "eval_batch_size", "checkpoint_every"}
)


@dataclass
class TrainConfig:
    """A LoRA training run (defaults: the built-in MiniLM on Rotten Tomatoes, r = 8 on query,value).

    Model and data:
        model: "minilm" or a local Hugging Face model directory. task: "classification" |
        "causal-lm". data: "rotten_tomatoes" | "sms_spam" | "trec" or a CSV/TSV/JSONL/text
        file. text_column / label_column / labels: see `load_dataset`. val_fraction and
        split_seed fix the train/validation split (independent of `seed`, so runs of several
        seeds are evaluated on the same examples).
    LoRA: targets (module-name suffixes, a regex string, or "all-linear"), r, alpha (α; the
        scale is α/r), dropout on the LoRA path.
    Optimisation: AdamW(lr, weight_decay); linear warm-up over warmup_ratio·steps, then
        linear decay to 0; gradient clipping at max_grad_norm; `steps` optimizer steps of
        `batch_size` examples per process (per GPU under DDP) of at most max_seq_len tokens;
        group_by_length: batches of similar lengths (less padding, ~1.5x faster on short texts).
    seed: LoRA init, classifier init, data order and dropout.
    Runtime: eval_every (validate at step 0 and every N steps; 0 = only at the end),
        checkpoint_every (steps; 0 = never), device
        ("auto" = CUDA when present), output_dir (None: train in memory, write nothing),
        resume (continue output_dir's checkpoint, or return its finished run), overwrite
        (replace what output_dir holds; without either, a directory holding a checkpoint or a
        trained adapter is refused: see `output_dir`), progress (tqdm bar on stderr).
    """

    model: str = "minilm"
    task: str = "classification"
    data: str = "rotten_tomatoes"
    text_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    steps: int = 200
    batch_size: int = 16
    max_seq_len: int = 64
    group_by_length: bool = True
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 64
    checkpoint_every: int = 100
    device: str = "auto"
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        # Paths are kept as strings so the config is JSON (metrics.json, manifest.json).
        self.model, self.data = str(self.model), str(self.data)
        if self.output_dir is not None:
            self.output_dir = str(self.output_dir)
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("r", "steps", "batch_size", "eval_batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            problems.append("targets is empty")
        for name in ("resume", "overwrite"):
            if getattr(self, name) and self.output_dir is None:
                problems.append(f"{name} needs an output_dir")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other (continue the run, or replace it)")
        if problems:
            raise LoraAnalysisError("invalid training config: " + "; ".join(problems))

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_known_fields(cls, data)

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the trained adapter (what must match to resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


def parse_targets(text: str) -> list[str] | str:
    """CLI spelling → LoraConfig.target_modules: "query,value" → ["query", "value"];
    "all-linear" stays; "re:<regex>" is a regex over full module names."""
    if text == ALL_LINEAR:
        return ALL_LINEAR
    if text.startswith("re:"):
        return text[3:]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LoraAnalysisError(f"empty target list {text!r}")
    return names
