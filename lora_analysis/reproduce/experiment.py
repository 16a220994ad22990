"""The experiment behind Section 7: which adapters to train and how to find their modules.

The paper (Hu et al. 2021, Sec. 7 and App. H) trains adapters of ranks r ∈ {1, 2, 4, 8, 64}
with two seeds on {W_q, W_v} and on {W_q} alone, then compares them module by module.
`ReproduceConfig` is that plan for any model and data set; `train_sweep` runs (or resumes)
the sweep and `Runs` gives back adapters and their modules by (rank, seed, targets, layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..adapters import Adapter, load_adapter
from ..config import matches_suffix
from ..errors import LoraAnalysisError
from ..fileio import read_json
from ..naming import layer_of
from ..training import TrainConfig, cell_name, run_sweep
from ..training.models import resolve_model

PAPER_RANKS = (1, 2, 4, 8, 64)
PAPER_SEEDS = (0, 1)


def default_run_dir(model: str, data: str, quick: bool, root: Path = Path("runs")) -> Path:
    """Where the sweep of `model` on `data` is trained: `<root>/reproduce-<model>-<data>[-quick]`
    (`reproduce` and `study` share these directories, so each reuses the other's cells)."""
    return Path(root) / f"reproduce-{Path(model).name}-{Path(data).stem}{'-quick' if quick else ''}"


@dataclass
class ReproduceConfig:
    """What to train and render.

    targets: the two projections the paper compares (W_q, W_v by default); the sweep trains
        on all of them and on the first alone (the paper's {W_q} row of Table 6).
    layers: layers shown in figures 6/7 (default: every layer); figures 3, 4, 8 and Table 7
        use `layer` (default: the middle one of `layers`, like the paper's 48th of 96).
    quick: a few steps per run on a small validation split — a first look and the tests.
    out: where figures and tables go; default `figures/` for a full run and `<run_dir>/figures`
        for a quick one (a first look never lands in the committed figures).
    null_draws: Haar-random draws behind every random baseline (default 1000; 200 quick).
    force: write into `out` even when it holds other files of the same names (see
        `render.check_output_dir`).
    """

    model: str = "minilm"
    data: str = "rotten_tomatoes"
    out: Path | None = None
    run_dir: Path | None = None
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    layers: list[int] | None = None
    layer: int | None = None
    ranks: tuple[int, ...] = PAPER_RANKS
    seeds: tuple[int, ...] = PAPER_SEEDS
    steps: int | None = None
    lr: float | None = None  # None: the training default
    batch_size: int = 16
    max_seq_len: int = 64
    quick: bool = False
    device: str = "auto"
    progress: bool = True
    null_draws: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.run_dir is None:
            self.run_dir = default_run_dir(self.model, self.data, self.quick)
        self.run_dir = Path(self.run_dir)
        if self.out is None:
            self.out = self.run_dir / "figures" if self.quick else Path("figures")
        self.out = Path(self.out)
        if self.null_draws is None:
            self.null_draws = 200 if self.quick else 1000
        if self.null_draws < 100:
            raise LoraAnalysisError(f"null_draws must be ≥ 100 (the 1 % and 99 % quantiles need them), got {self.null_draws}")
        for needed in (8, 64, 4):
            if needed not in self.ranks:
                raise LoraAnalysisError(f"the figures need rank {needed} in the sweep; ranks are {list(self.ranks)}")
        if len(self.seeds) < 2:
            raise LoraAnalysisError("figure 4 compares two seeds: give at least two")
        if not self.targets:
            raise LoraAnalysisError("targets is empty")

    @property
    def target_sets(self) -> list[list[str]]:
        """{all targets} and {first target} (paper: {W_q, W_v} and {W_q})."""
        sets = [list(self.targets)]
        if len(self.targets) > 1:
            sets.append([self.targets[0]])
        return sets

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model=self.model,
            data=self.data,
            steps=self.steps or (4 if self.quick else 200),
            batch_size=self.batch_size,
            max_seq_len=self.max_seq_len,
            # quick: a 256-example validation split keeps a first look under two minutes
            val_fraction=0.02 if self.quick else 0.1,
            checkpoint_every=0 if self.quick else 100,
            device=self.device,
            progress=self.progress,
            lr=TrainConfig.lr if self.lr is None else self.lr,
        )


@dataclass
class Runs:
    """The trained sweep: adapters and validation metrics per cell, modules by layer."""

    config: ReproduceConfig
    cells: dict[str, Path]

    def adapter(self, r: int, seed: int = 0, targets: list[str] | None = None) -> Adapter:
        return self._adapters[cell_name(r, seed, targets or self.config.targets)]

    def metrics(self, r: int, seed: int, targets: list[str]) -> dict:
        path = self.cells[cell_name(r, seed, targets)] / "metrics.json"
        return read_json(path, "training metrics")

    @cached_property
    def _adapters(self) -> dict[str, Adapter]:
        return {name: load_adapter(path) for name, path in self.cells.items()}

    @cached_property
    def layers(self) -> list[int]:
        """Layer indices holding the first target in the full-target adapter, ascending."""
        adapter = self.adapter(self.config.ranks[0], self.config.seeds[0])
        found = sorted({layer[1] for n in adapter
                        if (layer := layer_of(n)) is not None and matches_suffix(n, self.config.targets[:1])})
        if not found:
            raise LoraAnalysisError(f"no numbered layer holds target {self.config.targets[0]!r} in the trained adapters")
        wanted = self.config.layers
        if wanted is None:
            return found
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise LoraAnalysisError(f"layers {missing} not in the model; it has layers {found}")
        return sorted(set(wanted))

    @property
    def layer(self) -> int:
        """The layer of figures 3, 4, 8 and Table 7: chosen, else the middle one."""
        if self.config.layer is not None:
            if self.config.layer not in self.layers:
                raise LoraAnalysisError(f"layer {self.config.layer} not among {self.layers}")
            return self.config.layer
        return self.layers[len(self.layers) // 2]

    def module_name(self, adapter: Adapter, target: str, layer: int) -> str:
        """The adapter's module for projection `target` in `layer`."""
        names = [n for n in adapter if matches_suffix(n, [target]) and (layer_of(n) or (None, None))[1] == layer]
        if len(names) != 1:
            raise LoraAnalysisError(f"expected one {target!r} module in layer {layer}, found {names}")
        return names[0]


def train_sweep(config: ReproduceConfig) -> Runs:
    """Train the missing cells of the sweep (finished ones are reused, unfinished resumed)."""
    resolve_model(config.model)  # a bad model fails here, before any progress output
    assert config.run_dir is not None  # set by ReproduceConfig.__post_init__
    result = run_sweep(config.train_config(), config.run_dir, config.ranks, config.seeds, config.target_sets)
    return Runs(config, result.cells)
