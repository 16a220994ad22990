"""Training LoRA adapters with our own core: data sets, the loop, checkpoints, DDP, sweeps.

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
    "TrainResult": ".loop",
    "train": ".loop",
    "load_model": ".models",
    "SweepResult": ".sweep",
    "cell_name": ".sweep",
    "run_sweep": ".sweep",
}

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import BUILTIN_DATASETS, TextDataset, load_dataset, split_dataset
    from .loop import TrainResult, train
    from .models import load_model
    from .sweep import SweepResult, cell_name, run_sweep

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
