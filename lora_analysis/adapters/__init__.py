"""Adapters independent of any model: the data model and the file formats (read and write)."""

from .adapter import Adapter, LoraModule
from .apply import apply_adapter
from .files import load_adapter, save_adapter

__all__ = ["Adapter", "LoraModule", "apply_adapter", "load_adapter", "save_adapter"]
