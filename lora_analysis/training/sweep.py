"""Rank × seed × target-set sweeps into one run directory.

    result = run_sweep(TrainConfig(steps=200), "runs/sweep", ranks=[1, 2, 4, 8, 64], seeds=[0, 1],
                       target_sets=[["query", "value"], ["query"]])
    result.cells["r8-s0-query_value"]   # -> Path of that cell's PEFT adapter directory

Layout: `<run_dir>/<cell>/` per cell (adapter + metrics.json, see `train`) and
`<run_dir>/manifest.json` (base config, grid, per-cell metrics and wall time, library
versions), rewritten atomically after every cell. Re-running skips finished cells and resumes
unfinished ones from their checkpoints; cells of earlier, different grids stay listed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ..config import ALL_LINEAR
from ..errors import LoraAnalysisError
from ..fileio import atomic_write_text, read_json
from .checkpoint import check_recipe
from .config import TrainConfig
from .distributed import init_distributed
from .loop import library_versions, train

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lora_analysis.sweep/1"
# Fields that vary per cell or per invocation, so not part of the sweep's shared recipe.
CELL_FIELDS = ("r", "seed", "targets")


@dataclass
class SweepResult:
    """manifest: what manifest.json holds; cells: cell name → adapter directory (this grid's)."""

    run_dir: Path
    manifest_path: Path
    manifest: dict[str, Any]
    cells: dict[str, Path]


def cell_name(r: int, seed: int, targets: list[str] | str) -> str:
    """Stable directory name of a cell, e.g. `r8-s0-query_value`."""
    if isinstance(targets, list):
        slug = "_".join(targets)
    elif targets == ALL_LINEAR:
        slug = ALL_LINEAR
    else:  # a regex: readable part plus a hash so different regexes never collide
        slug = "re-" + re.sub(r"[^A-Za-z0-9]+", "_", targets).strip("_")[:24] + "-" + hashlib.sha1(targets.encode()).hexdigest()[:8]
    return f"r{r}-s{seed}-{slug}"


def run_sweep(
    base: TrainConfig,
    run_dir: str | Path,
    ranks: Sequence[int],
    seeds: Sequence[int],
    target_sets: Sequence[list[str] | str],
) -> SweepResult:
    """Train every (r, seed, targets) cell with `base`'s other settings; see the module doc."""
    if not (ranks and seeds and target_sets):
        raise LoraAnalysisError("a sweep needs at least one rank, one seed and one target set")
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST_NAME
    ctx = init_distributed(base.device)
    manifest = _open_manifest(manifest_path, base, ranks, seeds, target_sets)
    grid = list(itertools.product(target_sets, ranks, seeds))
    names = [cell_name(r, seed, targets) for targets, r, seed in grid]
    if len(set(names)) != len(names):
        raise LoraAnalysisError("the sweep grid repeats a cell (duplicate rank, seed or target set)")
    for name, (targets, r, seed) in zip(names, grid):
        manifest["cells"].setdefault(name, {"path": name, "r": r, "seed": seed, "targets": targets, "status": "pending"})
    if ctx.is_main:
        _write_manifest(manifest_path, manifest)
    for i, (name, (targets, r, seed)) in enumerate(zip(names, grid), start=1):
        if base.progress and ctx.is_main:
            print(f"lora-analysis: sweep cell {i}/{len(grid)}: {name}", file=sys.stderr)
        result = train(replace(base, r=r, seed=seed, targets=targets, output_dir=str(run_dir / name), resume=True))
        metrics = result.metrics
        manifest["cells"][name].update(
            status="finished",
            final=metrics["final"],
            initial=metrics["initial"],
            parameters=metrics["parameters"],
            wall_time_s=metrics["wall_time_s"],
        )
        if ctx.is_main:
            _write_manifest(manifest_path, manifest)
    return SweepResult(run_dir, manifest_path, manifest, {name: run_dir / name for name in names})


def _shared_recipe(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.recipe().items() if k not in CELL_FIELDS}


def _open_manifest(path: Path, base: TrainConfig, ranks, seeds, target_sets) -> dict[str, Any]:
    """The existing manifest (its recipe must match `base`) or a new one; grid and versions updated."""
    if path.is_file():
        manifest = read_json(path, "sweep manifest")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise LoraAnalysisError(f"{path}: not a sweep manifest ({MANIFEST_FORMAT})")
        check_recipe(path, _shared_recipe(TrainConfig.from_dict(manifest["config"])), _shared_recipe(base))
    else:
        manifest = {"format": MANIFEST_FORMAT, "cells": {}}
    manifest["config"] = {k: v for k, v in base.to_dict().items() if k not in CELL_FIELDS + ("output_dir", "resume")}
    manifest["grid"] = {"ranks": list(ranks), "seeds": list(seeds), "target_sets": list(target_sets)}
    manifest["versions"] = library_versions()
    return manifest


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
