"""Adapters independent of any model: the data model and the file formats (read and write).

Nothing here knows `torch.nn` models: putting an adapter into a model (`apply_adapter`) and
reading one out of it (`extract_adapter`) are the model side's, in `lora_analysis.lora`.
"""

from .adapter import Adapter, LoraModule, delta_weight
from .files import load_adapter, save_adapter

__all__ = ["Adapter", "LoraModule", "delta_weight", "load_adapter", "save_adapter"]
