"""Resized and extracted adapters, verified by accuracy: what `resize --eval`, `extract --eval`
and `--sweep-ranks` evaluate, and the rank curve.

    recipe = task_recipe("runs/r8")                        # the run's metrics.json, or None
    points = rank_sweep(adapter, [1, 2, 4, 8], recipe=recipe, model="minilm")
    points[0].result.energy_kept, points[0].evaluation.accuracy

Evaluation is `evaluate` on the adapter object that is (or would be) written: the same
validation split (the recipe's data, val_fraction and split_seed) and batch size, so
`evaluate(written_adapter, recipe, base=model)` gives the same numbers bit for bit.

A LoRA extracted from a full fine-tune of a classification model needs the fine-tuned task head
(the base has none, or an untrained one): `task_head` takes it from the fine-tuned model
(`head_module_names`: `classifier`, `score`, …) and `with_head` carries it as `modules_to_save`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..adapters import Adapter
from ..analysis.resize import RankRule, ResizeResult, resize_adapter
from ..analysis.spectrum import BaseWeightSource
from ..config import LoraConfig
from ..errors import LoraAnalysisError
from .config import TrainConfig
from .evaluation import EvalResult, evaluate, run_config
from .models import head_module_names, load_model, resolve_model


@dataclass
class RankPoint:
    """One rank of a sweep: the resize with `RankRule("rank", rank)` and, where evaluated, its
    validation metrics."""

    rank: int
    result: ResizeResult
    evaluation: EvalResult | None


def task_recipe(source: str | os.PathLike, overrides: dict | None = None) -> TrainConfig | None:
    """The training recipe of the run whose output is `source` (its metrics.json, in the directory
    or beside the file), with `overrides` (e.g. data, task) applied; None when there is no
    metrics.json and `overrides` does not name the data."""
    path = Path(source)
    recipe = run_config(path if path.is_dir() else path.parent)
    overrides = overrides or {}
    if recipe is None:
        if "data" not in overrides:
            return None
        recipe = TrainConfig()
    return replace(recipe, **overrides)


def check_task(recipe: TrainConfig, model: str | os.PathLike | None = None) -> None:
    """Refuse now, before any work, what `evaluate` would refuse later: unreadable data, an empty
    validation split, a model (default: the recipe's) that is not a local model directory."""
    from .data import load_dataset, split_dataset

    data = load_dataset(recipe.data, recipe.task, recipe.text_column, recipe.label_column, recipe.labels)
    if not len(split_dataset(data, recipe.val_fraction, recipe.split_seed)[1]):
        raise LoraAnalysisError(f"{recipe.data}: the validation split is empty (val_fraction {recipe.val_fraction})")
    resolve_model(recipe.model if model is None else os.fspath(model))


def task_head(finetuned: str | os.PathLike, recipe: TrainConfig) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of a fine-tuned classification model's task head (empty for
    causal LM: its head is tied or part of the base)."""
    if recipe.task != "classification":
        return {}
    from .data import load_dataset

    labels = load_dataset(recipe.data, recipe.task, recipe.text_column, recipe.label_column, recipe.labels).label_names
    model, _, _ = load_model(os.fspath(finetuned), recipe.task, labels)
    return {f"{head}.{name}": p.detach().clone() for head in head_module_names(model)
            for name, p in model.get_submodule(head).named_parameters()}


def with_head(adapter: Adapter, head: dict[str, torch.Tensor]) -> Adapter:
    """`adapter` carrying the task head `head` as modules_to_save (SEQ_CLS), as PEFT writes it."""
    if not head:
        return adapter
    tops = sorted({name.rsplit(".", 1)[0] for name in head})
    config = replace(adapter.config, modules_to_save=tops, task_type="SEQ_CLS")
    return replace(adapter, config=config, extra_tensors={**adapter.extra_tensors, **head})


def rank_sweep(
    adapter: Adapter,
    ranks: Sequence[int],
    *,
    recipe: TrainConfig | None = None,
    model: str | os.PathLike | None = None,
    head: dict[str, torch.Tensor] | None = None,
    base: BaseWeightSource | None = None,
    config: LoraConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    on_result: Callable[[int, Adapter], None] | None = None,
    svd: str = "auto",
) -> list[RankPoint]:
    """The best adapter of each rank in `ranks` (`resize_adapter` with rule rank k), evaluated on
    `recipe`'s validation split with `model` as the base when `recipe` is given; `head` is added
    to each (`with_head`). `on_result(k, adapter)` sees each adapter before the next rank (to
    write it). Energy kept (`ResizeResult.energy_kept`) is non-decreasing in k. `svd`: how dense
    ΔW are decomposed (`resize_adapter`)."""
    points = []
    for k in ranks:
        result = resize_adapter(adapter, RankRule("rank", k), base=base, config=config, device=device, progress=progress,
                                svd=svd)  # type: ignore[arg-type]
        result.adapter = with_head(result.adapter, head or {})
        if on_result is not None:
            on_result(k, result.adapter)
        evaluation = None
        if recipe is not None:
            evaluation = evaluate(result.adapter, recipe, base=model, device=device, progress=progress)
        points.append(RankPoint(k, result, evaluation))
    return points
