"""Rank × seed × target-set sweeps into one run directory, with full fine-tuning cells beside them.

    result = run_sweep(TrainConfig(steps=200), "runs/sweep", ranks=[1, 2, 4, 8, 64], seeds=[0, 1],
                       target_sets=[["query", "value"], ["query"]], methods=["lora", "full"])
    result.cells["r8-s0-query_value"]   # -> Path of that cell's PEFT adapter directory
    result.cells["full-s0"]             # -> Path of a fully fine-tuned model directory

LoRA cells are the grid target sets × ranks × seeds; full fine-tuning cells, one per seed
(rank and targets mean nothing there), are trained at `full_lr` (default: full fine-tuning's
own default learning rate), LoRA cells at the base config's lr.

Layout: `<run_dir>/<cell>/` per cell (adapter or model + metrics.json, see `train`) and
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
from .config import METHODS, TrainConfig
from .distributed import DistContext, init_distributed
from .loop import library_versions, run_training
from .output_dir import locked_on_main, looks_finished

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lora_analysis.sweep/1"
# Fields that vary per cell or per invocation, so not part of the sweep's shared recipe.
CELL_FIELDS = ("r", "seed", "targets", "method", "lr")
FULL = "full"


@dataclass
class SweepResult:
    """manifest: what manifest.json holds; cells: cell name → adapter directory (this grid's)."""

    run_dir: Path
    manifest_path: Path
    manifest: dict[str, Any]
    cells: dict[str, Path]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a LoRA cell (r, seed, targets) or a full fine-tuning cell (seed)."""

    method: str
    seed: int
    r: int | None = None
    targets: list[str] | str | None = None

    @property
    def name(self) -> str:
        if self.method == FULL:
            return full_cell_name(self.seed)
        assert self.r is not None and self.targets is not None, "a LoRA cell has a rank and targets"
        return cell_name(self.r, self.seed, self.targets)

    def record(self) -> dict[str, Any]:
        """What the manifest records of the cell (checked against it on every run)."""
        if self.method == FULL:
            return {"method": FULL, "seed": self.seed}
        return {"method": "lora", "r": self.r, "seed": self.seed, "targets": self.targets}

    def recorded_in(self, entry: dict[str, Any]) -> bool:
        """`entry` (a manifest's record of this cell's name) records this cell; manifests
        written before full fine-tuning existed record no method (LoRA)."""
        return {k: entry.get(k, "lora" if k == "method" else None) for k in self.record()} == self.record()


def full_cell_name(seed: int) -> str:
    """Stable directory name of a full fine-tuning cell: `full-s<seed>`."""
    return f"{FULL}-s{seed}"


def cell_name(r: int, seed: int, targets: list[str] | str) -> str:
    """Stable directory name of a LoRA cell, e.g. `r8-s0-query_value` (full fine-tuning
    cells are `full-s<seed>`)."""
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
    ranks: Sequence[int] = (),
    seeds: Sequence[int] = (0,),
    target_sets: Sequence[list[str] | str] = (),
    methods: Sequence[str] = ("lora",),
    full_lr: float | None = None,
) -> SweepResult:
    """Train every cell with `base`'s other settings: for "lora" in `methods` every
    (targets, r, seed), for "full" one full fine-tuning per seed at `full_lr` (None: the
    method's default); see the module doc."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise LoraAnalysisError(f"methods must be distinct names of {METHODS}, got {list(methods)}")
    if not seeds or ("lora" in methods and not (ranks and target_sets)):
        raise LoraAnalysisError("a sweep needs at least one seed, and for LoRA one rank and one target set")
    if base.overwrite:
        raise LoraAnalysisError("a sweep continues its cells and never overwrites them; to start over, use a new run directory")
    run_dir = Path(run_dir)
    cells = [Cell(method, seed, r, targets) for method in methods
             for targets, r, seed in (itertools.product(target_sets, ranks, seeds) if method == "lora" else
                                      ((None, None, seed) for seed in seeds))]
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise LoraAnalysisError("the sweep grid repeats a cell (duplicate rank, seed or target set)")
    grid = {"ranks": list(ranks), "seeds": list(seeds), "target_sets": list(target_sets), "methods": list(methods),
            "full_lr": replace(base, method=FULL, lr=full_lr).learning_rate if FULL in methods else None}
    ctx = init_distributed(base.device)
    with locked_on_main(run_dir, "sweep", ctx, lambda: None):
        return _sweep(base, run_dir, ctx, cells, grid)


def _sweep(base: TrainConfig, run_dir: Path, ctx: DistContext, cells: list[Cell], grid: dict[str, Any]) -> SweepResult:
    manifest_path = run_dir / MANIFEST_NAME
    manifest = _open_manifest(manifest_path, base, grid)
    for cell in cells:
        entry = manifest["cells"].setdefault(cell.name, {"path": cell.name, **cell.record(), "status": "pending"})
        if not cell.recorded_in(entry):
            raise InputFileError(manifest_path, f"malformed sweep manifest: cell {cell.name} does not record "
                                                f"{', '.join(f'{k}={v}' for k, v in cell.record().items())}")
    if ctx.is_main:
        _write_manifest(manifest_path, manifest)
    to_train = sum(base.steps for cell in cells if not looks_finished(run_dir / cell.name))
    with tqdm(total=to_train, desc="sweep", unit="step", file=sys.stderr, dynamic_ncols=True, smoothing=0,
              disable=not (base.progress and ctx.is_main and to_train)) as bar:
        for i, cell in enumerate(cells, start=1):
            name = cell.name
            bar.set_description(f"sweep {i}/{len(cells)} {name}", refresh=False)
            metrics = run_training(_cell_config(base, cell, grid["full_lr"], run_dir / name), bar).metrics
            manifest["cells"][name].update(
                status="finished",
                lr=metrics["config"]["lr"],
                final=metrics["final"],
                initial=metrics["initial"],
                parameters=metrics["parameters"],
                wall_time_s=metrics["wall_time_s"],
            )
            if ctx.is_main:
                _write_manifest(manifest_path, manifest)
    return SweepResult(run_dir, manifest_path, manifest, {cell.name: run_dir / cell.name for cell in cells})


def _cell_config(base: TrainConfig, cell: Cell, full_lr: float | None, output_dir: Path) -> TrainConfig:
    """The training config of one cell: `base` with the cell's settings, resuming."""
    if cell.method == FULL:
        return replace(base, method=FULL, lr=full_lr, seed=cell.seed, output_dir=str(output_dir), resume=True)
    assert cell.r is not None and cell.targets is not None, "a LoRA cell has a rank and targets"
    return replace(base, method="lora", r=cell.r, seed=cell.seed, targets=cell.targets, output_dir=str(output_dir),
                   resume=True)


def _shared_recipe(config: TrainConfig) -> dict[str, Any]:
    """The recipe every cell shares: LoRA's settings as a LoRA run records them (r, targets
    and lr vary per cell and are left out; a full fine-tuning cell's lr is the grid's full_lr)."""
    recipe = replace(config, method="lora").recipe()
    return {k: v for k, v in recipe.items() if k not in CELL_FIELDS} | {"lora_lr": recipe["lr"]}


def _open_manifest(path: Path, base: TrainConfig, grid: dict[str, Any]) -> dict[str, Any]:
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
        _check_full_lr(path, manifest, grid)
    else:
        manifest = {"format": MANIFEST_FORMAT, "cells": {}}
    manifest["config"] = {k: v for k, v in base.to_dict().items() if k not in ("r", "seed", "targets", "method", "output_dir", "resume")}
    manifest["config"]["lr"] = replace(base, method="lora").learning_rate  # LoRA cells' lr; full cells': grid's full_lr
    manifest["grid"] = grid
    manifest["versions"] = library_versions()
    return manifest


def _check_full_lr(path: Path, manifest: dict[str, Any], grid: dict[str, Any]) -> None:
    """Full fine-tuning cells of this run directory were trained at one lr: a different one is refused."""
    saved = [cell.get("lr") for cell in manifest["cells"].values() if cell.get("method") == FULL and "lr" in cell]
    if grid["full_lr"] is not None and saved and saved[0] != grid["full_lr"]:
        raise InputFileError(path, f"cannot resume, the run was started with different settings (full_lr: {saved[0]} -> {grid['full_lr']})")


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    if not isinstance(manifest.get("config"), dict):
        return "'config' is not an object"
    cells = manifest.get("cells")
    if not isinstance(cells, dict):
        return "'cells' is not an object"
    for name, cell in cells.items():
        if not (isinstance(cell, dict) and isinstance(cell.get("path"), str) and is_int(cell.get("seed"))
                and cell.get("status") in ("pending", "finished")):
            return f"cell {shown(name, 60)!r} is not a record of path, seed and status"
        if cell.get("method", "lora") == "lora" and not is_int(cell.get("r")):
            return f"LoRA cell {shown(name, 60)!r} does not record its rank r"
        if cell.get("method", "lora") not in METHODS:
            return f"cell {shown(name, 60)!r} records an unknown method {shown(cell.get('method'), 30)}"
    return None


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
