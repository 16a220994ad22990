"""lora_analysis: rank analysis and interpretability of LoRA adapters.

Reproduces Section 7 of "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021,
arXiv 2106.09685) on any model: spectra of ΔW = s·B·A from the factors (and of AdaLoRA, Tucker,
LoHa, LoKr, DoRA updates, from adapters of every common format), subspace similarity φ across
ranks, seeds and layers, and projections of ΔW against the pretrained W.

The names below are imported on first use (PEP 562): `import lora_analysis` loads neither
torch nor the training code until a name that needs them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports
from .version import __version__

# public name -> the subpackage or module that defines it
_EXPORTS = {
    "AdaLoraModule": ".adapters",
    "Adapter": ".adapters",
    "DenseModule": ".adapters",
    "DoraModule": ".adapters",
    "ExpertsModule": ".adapters",
    "KroneckerFactor": ".adapters",
    "LohaModule": ".adapters",
    "LokrModule": ".adapters",
    "LoraModule": ".adapters",
    "Storage": ".adapters",
    "TuckerModule": ".adapters",
    "Update": ".adapters",
    "UpdateInfo": ".adapters",
    "load_adapter": ".adapters",
    "save_adapter": ".adapters",
    "AdapterAnalysis": ".analysis",
    "AnalysisOptions": ".analysis",
    "adapter_spectra": ".analysis",
    "analyze_adapter": ".analysis",
    "compare_adapters": ".analysis",
    "compare_layers": ".analysis",
    "module_spectrum": ".analysis",
    "RankRule": ".analysis",
    "SvdOptions": ".analysis",
    "ResizeResult": ".analysis",
    "resize_adapter": ".analysis",
    "subspace_similarity": ".analysis",
    "BaseWeights": ".base_weights",
    "LoraConfig": ".config",
    "AdapterFormatError": ".errors",
    "LoraAnalysisError": ".errors",
    "ModuleResolutionError": ".errors",
    "LoraLinear": ".lora",
    "apply_adapter": ".lora",
    "extract_adapter": ".lora",
    "inject_lora": ".lora",
    "merge_lora": ".lora",
    "remove_lora": ".lora",
    "trainable_parameters": ".lora",
    "unmerge_lora": ".lora",
    "ModelPair": ".model_pair",
    "is_model_checkpoint": ".model_pair",
    "WeightPair": ".model_pair",
    "analyze_report": ".report",
    "compare_report": ".report",
    "render_report": ".report",
    "ScanResult": ".scan",
    "Shard": ".scan",
    "find_adapters": ".scan",
    "scan_adapters": ".scan",
    "StudyConfig": ".study",
    "run_study": ".study",
    "EvalResult": ".training",
    "RankPoint": ".training",
    "SweepResult": ".training",
    "TrainConfig": ".training",
    "TrainResult": ".training",
    "evaluate": ".training",
    "rank_sweep": ".training",
    "run_sweep": ".training",
    "train": ".training",
}

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .adapters import (
        AdaLoraModule,
        Adapter,
        DenseModule,
        DoraModule,
        ExpertsModule,
        KroneckerFactor,
        LohaModule,
        LokrModule,
        LoraModule,
        Storage,
        TuckerModule,
        Update,
        UpdateInfo,
        load_adapter,
        save_adapter,
    )
    from .analysis import (
        AdapterAnalysis,
        AnalysisOptions,
        RankRule,
        ResizeResult,
        SvdOptions,
        adapter_spectra,
        analyze_adapter,
        compare_adapters,
        compare_layers,
        module_spectrum,
        resize_adapter,
        subspace_similarity,
    )
    from .base_weights import BaseWeights
    from .config import LoraConfig
    from .errors import AdapterFormatError, LoraAnalysisError, ModuleResolutionError
    from .lora import (
        LoraLinear,
        apply_adapter,
        extract_adapter,
        inject_lora,
        merge_lora,
        remove_lora,
        trainable_parameters,
        unmerge_lora,
    )
    from .model_pair import ModelPair, WeightPair, is_model_checkpoint
    from .report import analyze_report, compare_report, render_report
    from .scan import ScanResult, Shard, find_adapters, scan_adapters
    from .study import StudyConfig, run_study
    from .training import (
        EvalResult,
        RankPoint,
        SweepResult,
        TrainConfig,
        TrainResult,
        evaluate,
        rank_sweep,
        run_sweep,
        train,
    )

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
