"""Adapters independent of any model: the update model, the file formats (read and write).

Each module's update is a small typed object (`updates.py`) whose one job is an exact factored
form of its ΔW; `Adapter` holds one per module (streamed from the file when read lazily);
`formats/` has one reader per format family, `containers.py` the bounded tensor files under
them. Nothing here knows `torch.nn` models: putting an adapter into a model (`apply_adapter`)
and reading one out of it (`extract_adapter`) are the model side's, in `lora_analysis.lora`.
"""

from .adapter import Adapter, LazyModules, LoraModule, delta_weight
from .files import load_adapter, save_adapter
from .updates import (
    AdaLoraModule,
    DenseModule,
    DoraDirection,
    DoraModule,
    ExpertsModule,
    KroneckerFactor,
    LohaModule,
    LokrModule,
    Storage,
    TuckerModule,
    Update,
    UpdateInfo,
    UpdateKind,
)

__all__ = [
    "AdaLoraModule",
    "Adapter",
    "DenseModule",
    "DoraDirection",
    "DoraModule",
    "ExpertsModule",
    "KroneckerFactor",
    "LazyModules",
    "LohaModule",
    "LokrModule",
    "LoraModule",
    "Storage",
    "TuckerModule",
    "Update",
    "UpdateInfo",
    "UpdateKind",
    "delta_weight",
    "load_adapter",
    "save_adapter",
]
