"""The analyses of Section 7 of the LoRA paper, on the factors.

- spectrum: exact thin SVD of every module's ΔW from its update's factored form (LoRA's s·B·A,
  AdaLoRA, Tucker, LoHa, LoKr, DoRA, dense; `module_spectrum`, `adapter_spectra`, `iter_spectra`
  → `ModuleSpectrum`), rank metrics on σ/σ₁ (`rank_metrics` → `RankMetrics`).
- dense_svd: the SVD of a formed ΔW (full fine-tuning): exact LAPACK, or randomized with a
  deterministic a-posteriori bound on every σ (`dense_svd`, `SvdOptions`: auto / exact / randomized).
- similarity: φ grids (`subspace_similarity`), bases "A" / "B" / "dW-left" / "dW-right"
  (`ModuleSpectrum.basis`), comparisons of modules, adapters and layers, chance level.
- projection: W's SVD (`weight_svd`, cached), Table 7 (`projection_norms`), Figure 8 (`phi_vs_weight`).
- intruders: intruder dimensions of W + ΔW (`intruder_dimensions`).
- analyze: `analyze_adapter` (`AnalysisOptions`), everything per module for reports.
- resize: the best rank-k adapter per module (`resize_adapter`, `RankRule` → `ResizeResult`),
  Eckart–Young truncation from the exact factored form; `extract` is it on a model pair.

Random references (random subspaces, sketches) are drawn with `seeding.seeded_generator` and
`seeding.random_basis`, re-exported here.
"""

from ..config import BASIS_KINDS, BasisKind
from ..seeding import random_basis, seeded_generator
from .analyze import AdapterAnalysis, AnalysisOptions, ModuleAnalysis, adapter_notes, analyze_adapter
from .dense_svd import SVD_METHODS, DenseSVD, SvdOptions, dense_svd
from .intruders import Intruders, intruder_dimensions
from .projection import (
    ProjectionNorms,
    WeightSpectrum,
    default_cache_dir,
    phi_vs_weight,
    projection_norms,
    weight_svd,
)
from .resize import ModuleResize, RankRule, ResizeResult, resize_adapter
from .similarity import (
    AdapterComparison,
    Comparison,
    LayerComparison,
    chance_level,
    compare_adapters,
    compare_bases,
    compare_layers,
    compare_modules,
    match_module_names,
    pair_basis,
    principal_angles,
    random_reference_grid,
    subspace_similarity,
)
from .spectrum import (
    DEFAULT_TAUS,
    Basis,
    MetricIntervals,
    ModuleSpectrum,
    RankMetrics,
    adapter_spectra,
    iter_spectra,
    module_spectrum,
    rank_metrics,
    rank_metrics_bounded,
)

__all__ = [
    "BASIS_KINDS",
    "DEFAULT_TAUS",
    "AdapterAnalysis",
    "AdapterComparison",
    "AnalysisOptions",
    "Basis",
    "BasisKind",
    "Comparison",
    "DenseSVD",
    "Intruders",
    "LayerComparison",
    "MetricIntervals",
    "ModuleAnalysis",
    "ModuleResize",
    "ModuleSpectrum",
    "ProjectionNorms",
    "RankMetrics",
    "RankRule",
    "ResizeResult",
    "SVD_METHODS",
    "SvdOptions",
    "WeightSpectrum",
    "adapter_notes",
    "adapter_spectra",
    "analyze_adapter",
    "chance_level",
    "compare_adapters",
    "compare_bases",
    "compare_layers",
    "compare_modules",
    "default_cache_dir",
    "dense_svd",
    "intruder_dimensions",
    "iter_spectra",
    "match_module_names",
    "module_spectrum",
    "pair_basis",
    "phi_vs_weight",
    "principal_angles",
    "projection_norms",
    "random_basis",
    "random_reference_grid",
    "rank_metrics",
    "rank_metrics_bounded",
    "resize_adapter",
    "seeded_generator",
    "subspace_similarity",
    "weight_svd",
]
