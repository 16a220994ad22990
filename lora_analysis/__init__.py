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
from .training import SweepResult, TrainConfig, TrainResult, run_sweep, train

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterAnalysis",
    "AdapterFormatError",
    "BaseWeights",
    "LoraAnalysisError",
    "LoraConfig",
    "LoraLinear",
    "LoraModule",
    "ModuleResolutionError",
    "SweepResult",
    "TrainConfig",
    "TrainResult",
    "adapter_spectra",
    "analyze_adapter",
    "analyze_report",
    "apply_adapter",
    "compare_adapters",
    "compare_layers",
    "compare_report",
    "extract_adapter",
    "inject_lora",
    "load_adapter",
    "merge_lora",
    "module_spectrum",
    "remove_lora",
    "render_report",
    "run_sweep",
    "save_adapter",
    "subspace_similarity",
    "train",
    "trainable_parameters",
    "unmerge_lora",
]
