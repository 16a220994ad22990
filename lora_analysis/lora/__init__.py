"""The LoRA core on `torch.nn` models: the layer, injection, merge/unmerge, and the bridge
between models and `Adapter`s (`extract_adapter` reads one out, `apply_adapter` puts one in)."""

from .apply import apply_adapter
from .inject import (
    extra_parameters,
    extract_adapter,
    find_target_modules,
    inject_lora,
    lora_layers,
    mark_trainable,
    merge_lora,
    named_lora_layers,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from .layer import LoraLinear, is_adaptable

__all__ = [
    "LoraLinear",
    "apply_adapter",
    "extra_parameters",
    "extract_adapter",
    "find_target_modules",
    "inject_lora",
    "is_adaptable",
    "lora_layers",
    "mark_trainable",
    "merge_lora",
    "named_lora_layers",
    "remove_lora",
    "trainable_parameters",
    "unmerge_lora",
]
