"""ΔW of the study's cells by (projection, layer): full fine-tuning's W_ft − W₀ and LoRA's s·B·A.

Full fine-tuning's ΔW is read one module at a time (`model_pair.ModelPair`) and decomposed by
an exact float64 SVD; only its singular values and top `TOP_VECTORS` singular vectors are kept.
LoRA's come from the factors (`analysis.adapter_spectra`). Both are keyed by the projection
type of `PROJECTIONS` and the layer index, so a LoRA module meets the full module it adapts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..analysis import adapter_spectra
from ..errors import LoraAnalysisError
from ..naming import layer_of
from ..training import full_cell_name
from .types import StudyRunsView

# Projection types of a transformer layer (BERT names), by the suffix of the module path. The
# order is the figures'; "attention.output" must be tried before "output".
PROJECTIONS = ("query", "key", "value", "attention.output", "intermediate", "output")
_SUFFIXES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attention.output": "attention.output.dense", "intermediate": "intermediate.dense", "output": "output.dense"}
TOP_VECTORS = 8  # singular vectors kept per full fine-tuning module (question 2 compares the top 8)


def projection_of(name: str) -> str | None:
    """The projection type of module `name` (`…layer.3.attention.self.query` → "query"), or None."""
    for projection in PROJECTIONS:
        if name.endswith("." + _SUFFIXES[projection]):
            return projection
    return None


def target_projection(target: str) -> str:
    """The projection type a LoRA target names ("query", "attention.output.dense", ...)."""
    found = projection_of("x." + target) or (target if target in PROJECTIONS else None)
    if found is None:
        raise LoraAnalysisError(f"LoRA target {target!r} is none of the projection types {list(PROJECTIONS)}")
    return found


@dataclass(frozen=True)
class DeltaSVD:
    """One module's ΔW = U diag(S) Vᵀ, (d_out, d_in): S (m,) float64 descending (all of them),
    U (d_out, k) and V (d_in, k) the top k singular vectors, float64."""

    name: str
    projection: str
    layer: int
    shape: tuple[int, int]
    S: np.ndarray
    U: np.ndarray
    V: np.ndarray


Key = tuple[str, int]  # (projection, layer)


def full_svds(runs: StudyRunsView, task: str, seed: int) -> dict[Key, DeltaSVD]:
    """Every projection of every layer of full fine-tuning's ΔW (cell `full-s<seed>`)."""
    base = _base_dir(runs)
    return dict(_full_svds(str(runs.cell_dir(task, full_cell_name(seed))), str(base)))


def _base_dir(runs: StudyRunsView) -> Path:
    from ..training.models import resolve_model

    return resolve_model(runs.config.model)[0]


@lru_cache(maxsize=8)
def _full_svds(cell: str, base: str) -> tuple[tuple[Key, DeltaSVD], ...]:
    from ..model_pair import ModelPair

    pair = ModelPair(cell, base)
    found: list[tuple[Key, DeltaSVD]] = []
    for name in pair.names:
        projection, layer = projection_of(name), layer_of(name)
        if projection is None or layer is None:
            continue
        delta = pair.delta(name)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(TOP_VECTORS, S.numel())
        found.append(((projection, layer[1]), DeltaSVD(name, projection, layer[1], (delta.shape[0], delta.shape[1]), S.numpy(),
                                                       U[:, :k].numpy(), Vh[:k].T.numpy())))
    if not found:
        raise LoraAnalysisError(f"{cell}: no layer holds any of the projections {list(PROJECTIONS)}")
    return tuple(found)


def lora_svds(runs: StudyRunsView, task: str, cell: str) -> dict[Key, DeltaSVD]:
    """Every module of a LoRA cell: S from the factors, U, V its top `TOP_VECTORS` (≤ r) vectors."""
    spectra = adapter_spectra(runs.adapter(task, cell), progress=False)
    found: dict[Key, DeltaSVD] = {}
    for name, spectrum in spectra.items():
        projection, layer = projection_of(name), layer_of(name)
        if projection is None or layer is None:
            continue
        S = spectrum.S.detach().cpu().double().numpy()
        k = min(TOP_VECTORS, spectrum.numerical_rank)
        found[(projection, layer[1])] = DeltaSVD(
            name, projection, layer[1], spectrum.shape, S,
            spectrum.U[:, :k].detach().cpu().double().numpy(), spectrum.V[:, :k].detach().cpu().double().numpy())
    return found


def layers_of(svds: dict[Key, DeltaSVD], projection: str) -> list[int]:
    return sorted(layer for p, layer in svds if p == projection)
