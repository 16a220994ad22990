"""Training LoRA adapters with our own core: data sets, the loop, checkpoints, DDP, sweeps."""

from .config import TrainConfig
from .data import BUILTIN_DATASETS, TextDataset, load_dataset, split_dataset
from .loop import TrainResult, train
from .models import load_model
from .sweep import SweepResult, cell_name, run_sweep

__all__ = [
    "BUILTIN_DATASETS",
    "SweepResult",
    "TextDataset",
    "TrainConfig",
    "TrainResult",
    "cell_name",
    "load_dataset",
    "load_model",
    "run_sweep",
    "split_dataset",
    "train",
]
