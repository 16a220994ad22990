"""Training LoRA adapters with our own core (or fine-tuning every weight): data sets, the loop,
checkpoints, DDP, sweeps, evaluation.

Names are imported on first use (PEP 562): the command line reads `TrainConfig`'s defaults for
its help without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": ".config",
    "BUILTIN_DATASETS": ".data",
    "TextDataset": ".data",
    "load_dataset": ".data",
    "split_dataset": ".data",
    "EvalResult": ".evaluation",
    "evaluate": ".evaluation",
    "run_config": ".evaluation",
    "TrainResult": ".loop",
    "train": ".loop",
    "load_model": ".models",
    "RankPoint": ".resize_eval",
    "rank_sweep": ".resize_eval",
    "SweepResult": ".sweep",
    "cell_name": ".sweep",
    "full_cell_name": ".sweep",
    "run_sweep": ".sweep",
}

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import BUILTIN_DATASETS, TextDataset, load_dataset, split_dataset
    from .evaluation import EvalResult, evaluate, run_config
    from .loop import TrainResult, train
    from .models import load_model
    from .resize_eval import RankPoint, rank_sweep
    from .sweep import SweepResult, cell_name, full_cell_name, run_sweep

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
