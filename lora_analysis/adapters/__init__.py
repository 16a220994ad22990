"""Adapters independent of any model: the data model and the file formats (read and write)."""

from .adapter import Adapter, LoraModule

__all__ = ["Adapter", "LoraModule"]
