"""The report's records: one `TypedDict` per object of `schema.json` (its `$defs` and their
inline objects), so the builder (`build.py`) and the renderers (`tables.py`, `html.py`) agree
on every key and type, and a JSON report read back is the same type.

A key the schema does not require is still always written by `build.py`; only keys that are
absent in some reports are optional here (`total=False`). `tests/test_report_types.py` checks
that every record has exactly its schema object's properties.
"""

from __future__ import annotations

from typing import Literal, TypedDict, Union

from ..config import BasisKind

ByThreshold = dict[str, int]  # schema `int_by_threshold`: τ key ("0.9") → integer


class AdapterInfo(TypedDict):
    """`$defs/adapter_info`: the adapter a report describes."""

    path: str
    format: str | None
    base_model_name_or_path: str | None
    num_modules: int
    alpha_known: bool
    kinds: dict[str, int]


class AnalyzedAdapterInfo(AdapterInfo):
    """`$defs/analyze_report/properties/adapter`: adapter_info plus what was analysed."""

    num_analyzed: int
    num_parameters: int


class BaseInfo(TypedDict):
    """`$defs/analyze_report/properties/base` when base weights were given."""

    path: str


class AnalyzeSettings(TypedDict):
    """`$defs/analyze_report/properties/settings`."""

    energy_thresholds: list[float]
    modules: list[str] | None
    top: int | None
    intruder_top_k: int | None
    intruder_epsilon: float | None


class _Chance(TypedDict):
    formula: str
    phi_1_1: float


class Chance(_Chance, total=False):
    """`$defs/phi_grid/properties/chance`: E[φ(i, j)] = max(i, j)/d of random subspaces."""

    mean_top_k_diagonal: float


class PhiGrid(TypedDict):
    """`$defs/phi_grid`: φ(i, j) as rows i, columns j (null beyond the numerical ranks)."""

    phi: list[list[float | None]]
    dim: int
    chance: Chance


class ProjectionNormsReport(TypedDict):
    """`$defs/base_report/properties/projection_norms`: paper Table 7, ‖UᵀWV‖_F."""

    delta: float
    weight: float
    random: float


class IntrudersReport(TypedDict):
    """`$defs/base_report/properties/intruders`."""

    top_k: int
    epsilon: float
    count: int
    indices: list[int]
    max_cosines: list[float]


class BaseReport(TypedDict):
    """`$defs/base_report`: one module against its pretrained W."""

    base_module: str
    weight_frobenius_norm: float
    projection_norms: ProjectionNormsReport
    amplification: float | None
    phi_weight: PhiGrid
    intruders: IntrudersReport | None


class SvdIntervals(TypedDict):
    """`$defs/svd_report/properties/intervals`: closed bounds [low, high] of a randomized spectrum's metrics."""

    sigma_max: list[float]
    stable_rank: list[float | None]
    numerical_rank: list[int]
    energy_rank: dict[str, list[int]]


class SvdReport(TypedDict):
    """`$defs/svd_report`: which SVD gave a module's spectrum, and its bound."""

    method: Literal["exact", "randomized"]
    sketch: int | None
    residual: float
    relative_residual: float
    resolved: bool
    singular_value_lower: list[float] | None
    singular_value_upper: list[float] | None
    intervals: SvdIntervals | None


ByThresholdOrNull = dict[str, Union[int, None]]  # int_by_threshold where a randomized SVD leaves a rank open


class ModuleReport(TypedDict):
    """`$defs/module_report`: one module's update, spectrum and rank metrics."""

    kind: str
    component: str | None
    storage: str
    shape: list[int]
    r: int | None
    alpha: float | None
    scale: float | None
    use_rslora: bool
    fan_in_fan_out: bool
    layer: str | None
    projection: str
    parameters: int
    frobenius_norm: float
    sigma_max: float | None
    stable_rank: float | None
    roy_vetterli_rank: float | None
    energy_effective_rank: float | None
    energy_rank: ByThresholdOrNull
    numerical_rank: int | None
    recommended_rank: ByThresholdOrNull
    parameter_saving: ByThresholdOrNull
    singular_values: list[float]
    svd: SvdReport
    base: BaseReport | None


class _GroupSummary(TypedDict):
    group: str
    modules: int
    parameters: int
    frobenius_norm: float
    mean_stable_rank: float | None
    mean_energy_effective_rank: float | None
    mean_numerical_rank: float | None
    mean_energy_rank: dict[str, float | None]
    recommended_parameters: ByThresholdOrNull


class GroupSummary(_GroupSummary, total=False):
    """`$defs/group_summary`: one row of a summary table; the base columns only with a base."""

    mean_amplification: float | None
    intruders: int | None


class Summary(TypedDict):
    """`$defs/analyze_report/properties/summary`."""

    overall: GroupSummary
    by_layer: list[GroupSummary]
    by_projection: list[GroupSummary]


class Recommendation(TypedDict):
    """`$defs/analyze_report/properties/recommendation/items`: every module cut to its energy
    rank at τ."""

    energy: float
    parameters: int
    recommended_parameters: int | None
    saving: int | None
    saving_fraction: float | None


class _NullReasons(TypedDict, total=False):
    """Top-level `null_reasons` (schema 2.0): JSON Pointer → why that number is null. Written
    only into JSON (`build.json_ready`), where a number is not a finite float64."""

    null_reasons: dict[str, str]


class AnalyzeReport(_NullReasons):
    """`$defs/analyze_report`: what `lora-analysis analyze` reports."""

    schema_version: str
    kind: Literal["analyze"]
    generator: str
    adapter: AnalyzedAdapterInfo
    base: BaseInfo | None
    settings: AnalyzeSettings
    notes: list[str]
    modules: dict[str, ModuleReport]
    summary: Summary
    recommendation: list[Recommendation]


class ModulePair(PhiGrid):
    """`$defs/module_pair`: φ between one module of adapter A and its match in B."""

    module_a: str
    module_b: str
    r_a: int | None
    r_b: int | None
    basis: BasisKind
    phi_1_1: float | None
    top_k: int
    mean_top_k_diagonal: float | None
    principal_angles_deg: list[float]


class CompareAdapters(TypedDict):
    """`$defs/compare_report/properties/adapters`."""

    a: AdapterInfo
    b: AdapterInfo


class CompareSettings(TypedDict):
    """`$defs/compare_report/properties/settings`."""

    top_k: int | None
    modules: list[str] | None


class CompareReport(_NullReasons):
    """`$defs/compare_report`: what `lora-analysis compare` reports."""

    schema_version: str
    kind: Literal["compare"]
    generator: str
    basis: BasisKind
    notes: list[str]
    adapters: CompareAdapters
    settings: CompareSettings
    pairs: dict[str, ModulePair]
    only_in_a: list[str]
    only_in_b: list[str]


Report = Union[AnalyzeReport, CompareReport]


def base_of(module: ModuleReport) -> BaseReport:
    """`module["base"]`, which every module of a report made with base weights has."""
    base = module["base"]
    if base is None:
        raise ValueError("this module was analysed without base weights")
    return base
