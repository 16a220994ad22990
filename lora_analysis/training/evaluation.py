"""Validation metrics: the training loop's, and `evaluate` for any trained model or adapter.

    result = evaluate("runs/r8")                       # a run directory: its own split and settings
    result = evaluate("runs/full", data="reviews.csv")  # another data set (split as TrainConfig says)
    result = evaluate(adapter, config, base="minilm")   # an Adapter object on its base model
    result.metrics["val_accuracy"], result.examples

Both use `validation_sums`: the validation examples sorted by length and cut into batches of
`eval_batch_size`, evaluated in `eval()` mode (no dropout) under `no_grad`. The same model,
split and batch size therefore give the same numbers bit for bit: `evaluate(run_dir)`
reproduces the `final` record of the run's metrics.json exactly (runs of one process; a DDP
run evaluated each rank's shard in its own batches).

Classification: accuracy and mean cross-entropy over examples. Causal LM: mean next-token
cross-entropy over the non-padding target tokens, and perplexity = exp(that mean).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..adapters import Adapter, load_adapter
from ..devices import resolve_device
from ..errors import InputFileError, LoraAnalysisError, ModuleResolutionError, shown
from ..fileio import read_json
from ..lora import apply_adapter
from ..naming import resolve_module_name
from .config import TrainConfig
from .data import collate, encode, load_dataset, split_dataset
from .model_files import weight_files
from .models import head_module_names, load_model, resolve_model
from .output_dir import METRICS_NAME, read_metrics


@torch.no_grad()
def validation_sums(
    model: nn.Module, token_ids: list[list[int]], labels: list[int] | None, indices: Sequence[int], *,
    pad_id: int, device: torch.device, batch_size: int, autocast: bool, bar: tqdm | None = None,
) -> list[float]:
    """[summed loss, correct predictions, count] over the examples `indices` of `token_ids`
    (with class ids `labels`, or None for causal LM: then count is the number of target
    tokens). `model` must be in eval mode; `bar` counts examples."""
    order = sorted(indices, key=lambda i: len(token_ids[i]))
    loss_sum = correct = count = 0.0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([token_ids[i] for i in chunk], pad_id, None if labels is None else [labels[i] for i in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if labels is not None:
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(chunk)
        else:
            targets = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
            count += (targets != -100).sum().item()
        if bar is not None:
            bar.update(len(chunk))
    return [loss_sum, correct, count]


def metrics_of(sums: Sequence[float], classify: bool) -> dict[str, float]:
    """{"val_loss", "val_accuracy"} (classification) or {"val_loss", "val_perplexity"} from
    `validation_sums`' [loss sum, correct, count]."""
    loss_sum, correct, count = sums
    record = {"val_loss": loss_sum / max(count, 1)}
    if classify:
        record["val_accuracy"] = correct / max(count, 1)
    else:
        record["val_perplexity"] = math.exp(min(record["val_loss"], 700.0))  # exp(700) is finite in float64
    return record


@dataclass
class EvalResult:
    """metrics: {"val_loss", "val_accuracy"} or {"val_loss", "val_perplexity"}, as a run's
    metrics.json records them; examples: validation examples; evaluated: what was evaluated
    (a model directory, or an adapter on its base); config: the recipe whose split was used."""

    metrics: dict[str, float]
    task: str
    examples: int
    evaluated: str
    config: TrainConfig

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("val_accuracy")

    @property
    def perplexity(self) -> float | None:
        return self.metrics.get("val_perplexity")


def evaluate(
    source: str | os.PathLike | Adapter,
    config: TrainConfig | None = None,
    *,
    base: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> EvalResult:
    """Evaluate a fine-tuned model or an adapter on a task's validation split.

    source: a Hugging Face model directory (e.g. a `train(method="full")` output), an adapter
        (any file or directory `load_adapter` reads, e.g. a LoRA run's output), or an `Adapter`.
    config: the recipe whose data, task, columns, labels, validation split (val_fraction,
        split_seed), max_seq_len and eval_batch_size are used. Default: the `metrics.json` next
        to `source` (a run directory; the same split the run was validated on). `overrides`
        replace its fields (e.g. `data="other.csv"`); without metrics.json and config they
        start from TrainConfig's defaults, and must name the data.
    base: the model an adapter is applied to (default: the recipe's `model`). Refused for a
        model directory.
    batch_size: evaluation batch (default: the recipe's eval_batch_size, which reproduces the
        run's numbers exactly).
    progress: a bar on stderr counting examples.

    Refused with one line (LoraAnalysisError): an empty validation split, a classification
    adapter without its trained head, a model whose labels differ from the data's.
    """
    config = _recipe(source, config, overrides)
    data = load_dataset(config.data, config.task, config.text_column, config.label_column, config.labels)
    _, val_set = split_dataset(data, config.val_fraction, config.split_seed)
    if not len(val_set):
        raise LoraAnalysisError(f"{config.data}: the validation split is empty (val_fraction {config.val_fraction})")
    resolved = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # a fresh head's initialisation leaves the caller's RNG alone
        model, tokenizer, evaluated = _load(source, config, base, data.label_names)
    model.to(resolved).eval()
    token_ids = encode(val_set.texts, tokenizer, config.max_seq_len)
    with tqdm(total=len(val_set), desc="evaluate", unit="ex", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        sums = validation_sums(model, token_ids, val_set.labels, range(len(val_set)), pad_id=tokenizer.pad_token_id,
                               device=resolved, batch_size=batch_size or config.eval_batch_size,
                               autocast=resolved.type == "cuda", bar=bar)
    return EvalResult(metrics_of(sums, config.task == "classification"), config.task, len(val_set), evaluated, config)


def run_config(directory: str | os.PathLike) -> TrainConfig | None:
    """The training recipe recorded in `directory/metrics.json` (a finished run of `train`),
    or None when there is none. A metrics.json that is not a finished run's is refused."""
    path = Path(directory) / METRICS_NAME
    if not path.is_file():
        return None
    return TrainConfig.from_dict(read_metrics(path)["config"])


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json and model weights, no adapter config."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").exists() and any(
        not name.startswith("adapter_") for name in weight_files(path)
    )


def _recipe(source: str | os.PathLike | Adapter, config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is None and not isinstance(source, Adapter):
        directory = Path(source) if Path(source).is_dir() else Path(source).parent
        config = run_config(directory)
    if config is None:
        if "data" not in overrides:
            where = "the adapter" if isinstance(source, Adapter) else shown(os.fspath(source))
            raise LoraAnalysisError(f"{where}: no {METRICS_NAME} records the data it was trained on; pass the run's "
                                    "config or the data (--data) to evaluate on")
        config = TrainConfig()
    runtime = {"output_dir": None, "resume": False, "overwrite": False, "progress": False}
    return replace(config, **{**overrides, **runtime})


def _load(source: str | os.PathLike | Adapter, config: TrainConfig, base: str | os.PathLike | None,
          label_names: list[str] | None) -> tuple[nn.Module, Any, str]:
    """(model ready to evaluate, its tokenizer, a description of it)."""
    if not isinstance(source, Adapter) and is_model_dir(Path(source)):
        if base is not None:
            raise LoraAnalysisError(f"{shown(os.fspath(source))}: a model directory is evaluated as it is; "
                                    "base applies to adapters only")
        if label_names is not None:
            _check_labels(Path(source), label_names)
        model, tokenizer, _ = load_model(os.fspath(source), config.task, label_names)
        return model, tokenizer, f"model {os.fspath(source)}"
    adapter = source if isinstance(source, Adapter) else load_adapter(source)
    base_model = config.model if base is None else os.fspath(base)
    model, tokenizer, _ = load_model(base_model, config.task, label_names)
    if config.task == "classification":
        _check_head(adapter, model, "the adapter" if isinstance(source, Adapter) else os.fspath(source))
    apply_adapter(model, adapter)
    what = "adapter" if isinstance(source, Adapter) else f"adapter {os.fspath(source)}"
    return model, tokenizer, f"{what} on {resolve_model(base_model)[1]}"


def _check_labels(directory: Path, label_names: list[str]) -> None:
    """The model's classes are the data's: as many, and named alike (or unnamed, LABEL_i)."""
    path = directory / "config.json"
    model_config = read_json(path, "model config")
    id2label = model_config.get("id2label") if isinstance(model_config, dict) else None
    if not isinstance(id2label, dict):
        return  # no label table: transformers sizes the head from num_labels, checked as it loads
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        raise InputFileError(path, "malformed id2label: its keys are not class ids") from None
    if len(names) != len(label_names):
        raise InputFileError(path, f"the model has {len(names)} classes, the data {len(label_names)} {shown(label_names)}")
    unnamed = names == [f"LABEL_{i}" for i in range(len(names))]
    if not unnamed and names != label_names:
        raise InputFileError(path, f"the model's classes {shown(names)} are not the data's {shown(label_names)} (in class-id order)")


def _check_head(adapter: Adapter, model: nn.Module, where: str) -> None:
    """A classification adapter must carry its trained head: a fresh one would be random."""
    for head in head_module_names(model):
        for name, _ in model.get_submodule(head).named_parameters():
            try:
                resolve_module_name(f"{head}.{name}", adapter.extra_tensors, "adapter's extra tensors")
            except ModuleResolutionError:
                raise LoraAnalysisError(f"{shown(where)}: has no trained classification head ({head}.{name}, saved as "
                                        "modules_to_save); evaluating it would score a random head") from None
