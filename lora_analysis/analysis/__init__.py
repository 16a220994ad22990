"""The analyses of Section 7 of the LoRA paper, on the factors.

- spectrum: exact thin SVD of every module's ΔW from its update's factored form (LoRA's s·B·A,
  AdaLoRA, Tucker, LoHa, LoKr, DoRA, dense; `module_spectrum`, `adapter_spectra`, `iter_spectra`
  → `ModuleSpectrum`), rank metrics on σ/σ₁ (`rank_metrics` → `RankMetrics`), `dense_svd`.
- similarity: φ grids (`subspace_similarity`), bases "A" / "B" / "dW-left" / "dW-right"
  (`ModuleSpectrum.basis`), comparisons of modules, adapters and layers, chance level.
- projection: W's SVD (`weight_svd`, cached), Table 7 (`projection_norms`), Figure 8 (`phi_vs_weight`).
- intruders: intruder dimensions of W + ΔW (`intruder_dimensions`).
- analyze: `analyze_adapter` (`AnalysisOptions`), everything per module for reports.

Random references (random subspaces, sketches) are drawn with `seeding.seeded_generator` and
`seeding.random_basis`, re-exported here.
"""

from ..config import BASIS_KINDS, BasisKind
from ..seeding import random_basis, seeded_generator
from .analyze import AdapterAnalysis, AnalysisOptions, ModuleAnalysis, adapter_notes, analyze_adapter
from .intruders import Intruders, intruder_dimensions
from .projection import (
    ProjectionNorms,
    WeightSpectrum,
    default_cache_dir,
    phi_vs_weight,
    projection_norms,
    weight_svd,
)
from .similarity import (
    AdapterComparison,
    Comparison,
    LayerComparison,
    chance_level,
    compare_adapters,
    compare_bases,
    compare_layers,
    compare_modules,
    pair_basis,
    principal_angles,
    random_reference_grid,
    subspace_similarity,
)
from .spectrum import (
    DEFAULT_TAUS,
    Basis,
    DenseSVD,
    ModuleSpectrum,
    RankMetrics,
    adapter_spectra,
    dense_svd,
    iter_spectra,
    module_spectrum,
    rank_metrics,
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
    "ModuleAnalysis",
    "ModuleSpectrum",
    "ProjectionNorms",
    "RankMetrics",
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
    "module_spectrum",
    "pair_basis",
    "phi_vs_weight",
    "principal_angles",
    "projection_norms",
    "random_basis",
    "random_reference_grid",
    "rank_metrics",
    "seeded_generator",
    "subspace_similarity",
    "weight_svd",
]
