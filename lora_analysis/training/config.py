"""`TrainConfig`: everything one training run needs, as one flat dataclass."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ALL_LINEAR, from_known_fields
from ..errors import LoraAnalysisError
from .data import TASKS

# Fields that do not change the trained weights: they may differ when a run is resumed.
RUNTIME_FIELDS = frozenset(
    {"output_dir", "resume", "overwrite", "progress", "device", "eval_every", "eval_batch_size", "checkpoint_every",
     "max_shard_size"}
)
METHODS = ("lora", "full")
# Peak learning rates by method when `lr` is not given. LoRA trains few, zero-initialised
# parameters and takes a large rate; full fine-tuning moves every pretrained weight and
# diverges from it at such rates (BERT-style recipes use 2e-5 to 5e-5). Both measured on the
# built-in default: benchmarks/README.md.
DEFAULT_LR = {"lora": 2e-3, "full": 5e-5}
# LoRA's own settings: not part of a full fine-tuning run's recipe.
LORA_FIELDS = ("targets", "r", "alpha", "dropout")
# transformers 4's long-standing default (the Hub's convention): a model above 5 GB is saved
# in shards of at most this size, with model.safetensors.index.json.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


@dataclass
class TrainConfig:
    """A training run: LoRA (the default: the built-in MiniLM on Rotten Tomatoes, r = 8 on
    query,value) or full fine-tuning (`method="full"`).

    Model and data:
        model: "minilm" or a local Hugging Face model directory. task: "classification" |
        "causal-lm". data: "rotten_tomatoes" | "sms_spam" | "trec" or a CSV/TSV/JSONL/text
        file. text_column / label_column / labels: see `load_dataset`. val_fraction and
        split_seed fix the train/validation split (independent of `seed`, so runs of several
        seeds are evaluated on the same examples).
    method: "lora" (train LoRA factors and the task head; the output is a PEFT adapter) or
        "full" (train every parameter; the output is a Hugging Face model directory, sharded
        above max_shard_size bytes).
    LoRA: targets (module-name suffixes, a regex string, or "all-linear"), r, alpha (α; the
        scale is α/r), dropout on the LoRA path. Ignored by full fine-tuning (and not part of
        its recipe).
    Optimisation: AdamW(lr, weight_decay), lr None = the method's default (DEFAULT_LR: 2e-3
        for LoRA, 5e-5 for full fine-tuning; `learning_rate` is the one used); linear warm-up over warmup_ratio·steps, then
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
    method: str = "lora"
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    lr: float | None = None
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
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE

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
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("r", "steps", "batch_size", "eval_batch_size", "max_seq_len", "max_shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
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

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: `lr`, or the method's default when it is None."""
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_known_fields(cls, data)

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the trained weights (what must match to resume), with the
        learning rate resolved (`lr=None` and the method's default spelled out are one recipe)."""
        ignored = RUNTIME_FIELDS | (set(LORA_FIELDS) if self.method == "full" else set())
        recipe = {k: v for k, v in self.to_dict().items() if k not in ignored}
        recipe["lr"] = self.learning_rate
        return recipe


def saved_recipe(saved: Any) -> Any:
    """A recipe recorded by an earlier version, in today's terms: runs from before full
    fine-tuning existed record no method, and were LoRA runs."""
    if isinstance(saved, dict) and "method" not in saved:
        return {**saved, "method": "lora"}
    return saved


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


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """A size in bytes from "500MB", "5GB", "2GiB" or "1234" (KB/MB/GB are powers of 10, as
    transformers' `max_shard_size` reads them; KiB/MiB/GiB powers of 2). ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 500MB, 5GB, 2GiB or a number of bytes)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"size {text!r} is less than one byte")
    return size
