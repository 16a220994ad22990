"""Rank × seed × target-set sweeps into one run directory.

    result = run_sweep(TrainConfig(steps=200), "runs/sweep", ranks=[1, 2, 4, 8, 64], seeds=[0, 1],
                       target_sets=[["query", "value"], ["query"]])
    result.cells["r8-s0-query_value"]   # -> Path of that cell's PEFT adapter directory

Layout: `<run_dir>/<cell>/` per cell (adapter + metrics.json, see `train`) and
`<run_dir>/manifest.json` (base config, grid, per-cell metrics and wall time, library
versions), rewritten atomically after every cell. Re-running skips finished cells and resumes
unfinished ones from their checkpoints; cells of earlier, different grids stay listed.

Locks: the sweep holds the run directory's lock for its whole duration (two sweeps into one
run directory would overwrite each other's manifest), and each cell's training holds its
cell directory's lock (so a `train --output-dir <run_dir>/<cell>` started beside it is refused
too). One progress bar counts the steps of every cell still to train: one ETA for the sweep.
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

from tqdm import tqdm

from ..config import ALL_LINEAR
from ..errors import InputFileError, LoraAnalysisError, shown
from ..fileio import atomic_write_text, read_json
from .checkpoint import check_recipe, is_int
from .config import TrainConfig
from .distributed import DistContext, init_distributed
from .loop import library_versions, run_training
from .output_dir import locked_on_main, looks_finished

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
    if base.overwrite:
        raise LoraAnalysisError("a sweep continues its cells and never overwrites them; to start over, use a new run directory")
    run_dir = Path(run_dir)
    grid = list(itertools.product(target_sets, ranks, seeds))
    names = [cell_name(r, seed, targets) for targets, r, seed in grid]
    if len(set(names)) != len(names):
        raise LoraAnalysisError("the sweep grid repeats a cell (duplicate rank, seed or target set)")
    ctx = init_distributed(base.device)
    with locked_on_main(run_dir, "sweep", ctx, lambda: None):
        return _sweep(base, run_dir, ctx, list(zip(names, grid)), (ranks, seeds, target_sets))


def _sweep(base: TrainConfig, run_dir: Path, ctx: DistContext, cells: list, grid: tuple) -> SweepResult:
    manifest_path = run_dir / MANIFEST_NAME
    manifest = _open_manifest(manifest_path, base, *grid)
    for name, (targets, r, seed) in cells:
        entry = manifest["cells"].setdefault(name, {"path": name, "r": r, "seed": seed, "targets": targets, "status": "pending"})
        if (entry.get("r"), entry.get("seed"), entry.get("targets")) != (r, seed, targets):
            raise InputFileError(manifest_path, f"malformed sweep manifest: cell {name} does not record r={r}, seed={seed} and its targets")
    if ctx.is_main:
        _write_manifest(manifest_path, manifest)
    to_train = sum(base.steps for name, _ in cells if not looks_finished(run_dir / name))
    with tqdm(total=to_train, desc="sweep", unit="step", file=sys.stderr, dynamic_ncols=True, smoothing=0,
              disable=not (base.progress and ctx.is_main and to_train)) as bar:
        for i, (name, (targets, r, seed)) in enumerate(cells, start=1):
            bar.set_description(f"sweep {i}/{len(cells)} {name}", refresh=False)
            cell = replace(base, r=r, seed=seed, targets=targets, output_dir=str(run_dir / name), resume=True)
            metrics = run_training(cell, bar).metrics
            manifest["cells"][name].update(
                status="finished",
                final=metrics["final"],
                initial=metrics["initial"],
                parameters=metrics["parameters"],
                wall_time_s=metrics["wall_time_s"],
            )
            if ctx.is_main:
                _write_manifest(manifest_path, manifest)
    return SweepResult(run_dir, manifest_path, manifest, {name: run_dir / name for name, _ in cells})


def _shared_recipe(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.recipe().items() if k not in CELL_FIELDS}


def _open_manifest(path: Path, base: TrainConfig, ranks, seeds, target_sets) -> dict[str, Any]:
    """The existing manifest (its recipe must match `base`) or a new one; grid and versions updated."""
    if path.is_file():
        manifest = read_json(path, "sweep manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise InputFileError(path, f"not a sweep manifest ({MANIFEST_FORMAT})")
        problem = _manifest_problem(manifest)
        if problem:
            raise InputFileError(path, f"malformed sweep manifest: {problem}")
        try:
            saved = _shared_recipe(TrainConfig.from_dict(manifest["config"]))
        except (LoraAnalysisError, TypeError, ValueError) as err:
            raise InputFileError(path, f"malformed sweep manifest: 'config' is not a training config ({err})") from None
        check_recipe(path, saved, _shared_recipe(base), InputFileError)
    else:
        manifest = {"format": MANIFEST_FORMAT, "cells": {}}
    manifest["config"] = {k: v for k, v in base.to_dict().items() if k not in CELL_FIELDS + ("output_dir", "resume")}
    manifest["grid"] = {"ranks": list(ranks), "seeds": list(seeds), "target_sets": list(target_sets)}
    manifest["versions"] = library_versions()
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    if not isinstance(manifest.get("config"), dict):
        return "'config' is not an object"
    cells = manifest.get("cells")
    if not isinstance(cells, dict):
        return "'cells' is not an object"
    for name, cell in cells.items():
        if not (isinstance(cell, dict) and isinstance(cell.get("path"), str) and is_int(cell.get("r"))
                and is_int(cell.get("seed")) and cell.get("status") in ("pending", "finished")):
            return f"cell {shown(name, 60)!r} is not a record of path, r, seed and status"
    return None


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
