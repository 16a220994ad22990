"""The LoRA core: a layer wrapping Linear/Conv1D, injection into a model, merge/unmerge."""

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
from .layer import LoraLinear, is_adaptable, is_conv1d, linear_shape

__all__ = [
    "LoraLinear",
    "extra_parameters",
    "extract_adapter",
    "find_target_modules",
    "inject_lora",
    "is_adaptable",
    "is_conv1d",
    "linear_shape",
    "lora_layers",
    "mark_trainable",
    "merge_lora",
    "named_lora_layers",
    "remove_lora",
    "trainable_parameters",
    "unmerge_lora",
]
