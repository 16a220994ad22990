"""lora_analysis: rank analysis and interpretability of LoRA adapters.

Reproduces Section 7 of "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021,
arXiv 2106.09685) on any model: spectra of ΔW = s·B·A from the factors, subspace similarity φ
across ranks, seeds and layers, and projections of ΔW against the pretrained W.
"""

from .adapters import Adapter, LoraModule, apply_adapter, load_adapter, save_adapter
from .analysis import (
    AdapterAnalysis,
    adapter_spectra,
    analyze_adapter,
    compare_adapters,
    compare_layers,
    module_spectrum,
    subspace_similarity,
)
from .base_weights import BaseWeights
from .config import LoraConfig
from .errors import AdapterFormatError, LoraAnalysisError, ModuleResolutionError
from .lora import (
    LoraLinear,
    extract_adapter,
    inject_lora,
    merge_lora,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from .report import analyze_report, compare_report, render_report

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterAnalysis",
    "BaseWeights",
    "adapter_spectra",
    "analyze_adapter",
    "compare_adapters",
    "compare_layers",
    "module_spectrum",
    "subspace_similarity",
    "AdapterFormatError",
    "analyze_report",
    "compare_report",
    "render_report",
    "LoraAnalysisError",
    "LoraConfig",
    "LoraLinear",
    "LoraModule",
    "ModuleResolutionError",
    "apply_adapter",
    "extract_adapter",
    "inject_lora",
    "load_adapter",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "trainable_parameters",
    "unmerge_lora",
]
