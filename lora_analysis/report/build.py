"""Turn analysis results into report dicts (`schema.json`): JSON-ready, the single source every
renderer (text, markdown, JSON, HTML) reads.

φ grids become lists of rows, i by j. Numbers stay Python floats here (the text renderers
show a non-finite one as "—"); `json_ready` turns each number that is not a finite float64 into
null and records why under `null_reasons`, keyed by its JSON Pointer, so JSON output is strict
RFC 8259 whatever the computation produced.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..naming import projection_type
from ..version import __version__
from .grouping import layer_labels, model_order
from .summary import recommendation, summarize, tau_key
from .types import (
    AdapterInfo,
    AnalyzedAdapterInfo,
    AnalyzeReport,
    BaseReport,
    Chance,
    CompareReport,
    ModulePair,
    ModuleReport,
    PhiGrid,
    SvdReport,
)

if TYPE_CHECKING:
    from ..adapters import Adapter, UpdateInfo
    from ..analysis import AdapterAnalysis, AdapterComparison, ModuleAnalysis

SCHEMA_VERSION = "2.1"
NON_FINITE_REASONS = {
    "nan": "NaN: undefined in float64 (a 0/0 or ∞ − ∞ in its computation)",
    "inf": "+Infinity: beyond the float64 range (> 1.8e308)",
    "-inf": "-Infinity: beyond the float64 range (< -1.8e308)",
}


def generator() -> str:
    return f"lora-analysis {__version__}"


def adapter_info(adapter: "Adapter") -> AdapterInfo:
    """`schema.json#/$defs/adapter_info` of an adapter (path: where it was loaded from)."""
    return {
        "path": adapter.source or "",
        "format": adapter.source_format,
        "base_model_name_or_path": adapter.config.base_model_name_or_path,
        "num_modules": len(adapter),
        "alpha_known": adapter.alpha_known,
        "kinds": adapter.kinds,
    }


def analyze_report(
    analysis: "AdapterAnalysis",
    adapter: "Adapter",
    *,
    num_modules: int | None = None,
    base_names: Mapping[str, str] | None = None,
    patterns: Sequence[str] | None = None,
    top: int | None = None,
) -> AnalyzeReport:
    """The `analyze` report of `adapter` (its selected modules) from `analysis`, modules in
    model order (`grouping.model_order`).

    num_modules: modules in the adapter file before selection (default: len(adapter)).
    base_names: adapter module → its weight's name in the base checkpoint.
    top: list only the N modules with the largest ‖ΔW‖_F; summaries cover all of them.
    """
    taus = list(analysis.taus)
    layers = layer_labels(list(analysis.modules))
    base_names = base_names or {}
    entries = {
        name: module_entry(name, adapter.info(name), analysis.modules[name], taus, layers[name], base_names.get(name, name))
        for name in sorted(analysis.modules, key=model_order)
    }
    shown = entries
    if top is not None:
        ranked = sorted(entries, key=lambda n: entries[n]["frobenius_norm"], reverse=True)[:top]
        shown = {name: entries[name] for name in ranked}
    intruders = next((r.intruders for r in analysis.modules.values() if r.intruders is not None), None)
    info: AnalyzedAdapterInfo = {
        **adapter_info(adapter),
        "num_modules": len(adapter) if num_modules is None else num_modules,
        "num_analyzed": len(entries),
        "num_parameters": sum(e["parameters"] for e in entries.values()),
    }
    reasons = {f"/modules/{_pointer_token(name)}{pointer}": why for name in shown
               for pointer, why in _bounded_reasons(entries[name]).items()}
    report: AnalyzeReport = {
        "schema_version": SCHEMA_VERSION,
        "kind": "analyze",
        "generator": generator(),
        "adapter": info,
        "base": None if analysis.base_source is None else {"path": analysis.base_source},
        "settings": {
            "energy_thresholds": taus,
            "modules": list(patterns) if patterns else None,
            "top": top,
            "intruder_top_k": None if intruders is None else intruders.k,
            "intruder_epsilon": None if intruders is None else intruders.epsilon,
        },
        "notes": list(analysis.notes) + _zero_note(entries),
        "modules": shown,
        "summary": summarize(entries, taus),
        "recommendation": recommendation(entries, taus),
    }
    if reasons:
        report["null_reasons"] = reasons
    return report


def module_entry(name: str, info: "UpdateInfo", result: "ModuleAnalysis", taus: Sequence[float],
                 layer: str | None, base_name: str) -> ModuleReport:
    """`schema.json#/$defs/module_report` of one module from its update's info and analysis.

    Recommended rank k at τ: a LoRA of rank k keeps that share of ΔW's energy (Eckart–Young),
    with k·(d_in + d_out) parameters; the saving is against the update's own parameters (so it
    is negative where the update is smaller than that LoRA, as LoKr's often are)."""
    metrics = result.metrics
    energy_rank = {tau_key(t): _int(metrics.energy_rank[t]) for t in taus}
    d_out, d_in = info.shape
    return {
        "kind": info.kind,
        "component": info.component,
        "storage": info.storage.describe(),
        "shape": [d_out, d_in],
        "r": info.r,
        "alpha": _number(info.alpha),
        "scale": info.scale,
        "use_rslora": info.use_rslora,
        "fan_in_fan_out": info.storage.transposed is True,
        "layer": layer,
        "projection": projection_type(name),
        "parameters": info.parameters,
        "frobenius_norm": metrics.frobenius,
        "sigma_max": metrics.sigma_max,
        "stable_rank": metrics.stable_rank,
        "roy_vetterli_rank": metrics.roy_vetterli_rank,
        "energy_effective_rank": metrics.energy_effective_rank,
        "energy_rank": energy_rank,
        "numerical_rank": _int(metrics.numerical_rank),
        "recommended_rank": energy_rank,
        "parameter_saving": {k: None if v is None else info.parameters - v * (d_in + d_out) for k, v in energy_rank.items()},
        "singular_values": [float(s) for s in result.spectrum.S],
        "svd": svd_entry(result, taus),
        "base": base_entry(result, base_name),
    }


def svd_entry(result: "ModuleAnalysis", taus: Sequence[float]) -> SvdReport:
    """`schema.json#/$defs/svd_report`: which SVD gave the module's spectrum and, for a randomized
    one, its bound: singular_values are then σ(B) of the sketch, and each true σᵢ lies in
    [singular_value_lower[i], singular_value_upper[i]]."""
    spectrum, intervals = result.spectrum, result.metrics.intervals
    norm = result.metrics.frobenius
    lower, upper = (None, None) if spectrum.exact else ([float(x) for x in b] for b in spectrum.bounds())
    return {
        "method": "exact" if spectrum.exact else "randomized",
        "sketch": spectrum.sketch,
        "residual": spectrum.residual,
        "relative_residual": spectrum.residual / norm if norm else 0.0,
        "resolved": spectrum.resolved,
        "singular_value_lower": lower,
        "singular_value_upper": upper,
        "intervals": None if intervals is None else {
            "sigma_max": list(intervals.sigma_max),
            "stable_rank": list(intervals.stable_rank),
            "numerical_rank": list(intervals.numerical_rank),
            "energy_rank": {tau_key(t): list(intervals.energy_rank[t]) for t in taus},
        },
    }


def _bounded_reasons(entry: ModuleReport) -> dict[str, str]:
    """Why a module's numbers are null where its randomized SVD leaves them undetermined (JSON
    Pointers below the module)."""
    intervals = entry["svd"]["intervals"]
    if intervals is None:
        return {}
    bounded = "randomized SVD: known only within the interval at /svd/intervals/"
    reasons = {"/sigma_max": bounded + "sigma_max", "/stable_rank": bounded + "stable_rank"}
    whole = ("needs the whole spectrum; the randomized SVD resolves σ₁..σ_l only (the rest ≤ residual)")
    reasons.update({"/roy_vetterli_rank": whole, "/energy_effective_rank": whole})
    if entry["numerical_rank"] is None:
        reasons["/numerical_rank"] = bounded + "numerical_rank"
    for key, value in entry["energy_rank"].items():
        if value is None:
            for field in ("energy_rank", "recommended_rank", "parameter_saving"):
                reasons[f"/{field}/{_pointer_token(key)}"] = bounded + f"energy_rank/{_pointer_token(key)}"
    return reasons


def _int(value: int | None) -> int | None:
    return None if value is None else int(value)


def base_entry(result: "ModuleAnalysis", base_name: str) -> BaseReport | None:
    """`schema.json#/$defs/base_report`: one module against its pretrained weight W (None when
    it was analysed without one)."""
    projection, intruders = result.projection, result.intruders
    if projection is None or result.phi_vs_weight is None:
        return None
    return {
        "base_module": base_name,
        "weight_frobenius_norm": projection.weight_norm,
        "projection_norms": {"delta": projection.delta, "weight": projection.weight, "random": projection.random},
        "amplification": _number(projection.amplification),
        "phi_weight": phi_grid(result.phi_vs_weight, result.spectrum.d_out),
        "intruders": None if intruders is None else {
            "top_k": intruders.k,
            "epsilon": intruders.epsilon,
            "count": intruders.count,
            "indices": [int(i) for i in np.flatnonzero(intruders.is_intruder)],
            "max_cosines": [float(c) for c in intruders.max_cos],
        },
    }


def phi_grid(grid: np.ndarray, dim: int, top_k: int | None = None) -> PhiGrid:
    """`schema.json#/$defs/phi_grid`: φ as rows (NaN → null), d, and the chance level."""
    chance: Chance = {"formula": "max(i, j) / d", "phi_1_1": 1.0 / dim}
    if top_k:
        chance["mean_top_k_diagonal"] = (top_k + 1) / 2 / dim  # mean of i/d over i = 1..k
    return {"phi": [[_number(x) for x in row] for row in np.asarray(grid, dtype=float)], "dim": dim, "chance": chance}


def compare_report(
    comparison: "AdapterComparison",
    adapter_a: "Adapter",
    adapter_b: "Adapter",
    *,
    top_k: int | None = None,
    patterns: Sequence[str] | None = None,
    notes: Sequence[str] | None = None,
) -> CompareReport:
    """The `compare` report: per module pair the full φ grid, summary numbers, chance level.
    `notes`: caveats of the adapters (unknown α, how their formats were read)."""
    pairs: dict[str, ModulePair] = {}
    for name_a, c in comparison.modules.items():
        name_b = comparison.matched[name_a]
        pairs[name_a] = {
            "module_a": name_a,
            "module_b": name_b,
            "r_a": adapter_a.info(name_a).r,
            "r_b": adapter_b.info(name_b).r,
            "basis": c.basis,
            **phi_grid(c.grid, c.dim, c.top_k),
            "phi_1_1": _number(c.phi_11),
            "top_k": max(int(c.top_k), 1),
            "mean_top_k_diagonal": _number(c.top_k_mean),
            "principal_angles_deg": [float(math.degrees(a)) for a in c.principal_angles],
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "compare",
        "generator": generator(),
        "basis": comparison.basis,
        "notes": list(notes or []) + _basis_note(pairs, comparison.basis),
        "adapters": {"a": adapter_info(adapter_a), "b": adapter_info(adapter_b)},
        "settings": {"top_k": top_k, "modules": list(patterns) if patterns else None},
        "pairs": pairs,
        "only_in_a": list(comparison.only_in_a),
        "only_in_b": list(comparison.only_in_b),
    }


def _basis_note(pairs: Mapping[str, ModulePair], asked: str) -> list[str]:
    other = sorted({p["basis"] for p in pairs.values() if p["basis"] != asked})
    if not other:
        return []
    count = sum(p["basis"] != asked for p in pairs.values())
    return [f"{count} module pair(s) compared in basis {' / '.join(other)}: their update kind (LoHa, LoKr, DoRA, "
            f"dense, fused experts) has no factor {asked}; dW-right / dW-left are ΔW's own singular vectors "
            "of the same space"]


def _zero_note(entries: Mapping[str, ModuleReport]) -> list[str]:
    zero = [name for name, e in entries.items() if e["frobenius_norm"] == 0.0]
    if not zero:
        return []
    return [f"ΔW = 0 in {len(zero)} module(s) (e.g. {zero[0]}): B = 0, as after initialization? "
            "Their ranks are 0 and the recommendation drops them"]


def _number(x: float | np.floating | None) -> float | None:
    """float, or None for None/NaN/Inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None



def json_ready(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `report` for JSON: every float that is not finite becomes None, and
    `null_reasons` maps its JSON Pointer (RFC 6901, e.g. "/modules/q/stable_rank") to why."""
    reasons: dict[str, str] = dict(report.get("null_reasons", {}))
    clean: dict[str, Any] = _finite_or_null({k: v for k, v in report.items() if k != "null_reasons"}, "", reasons)
    if reasons:
        clean["null_reasons"] = reasons
    return clean


def _finite_or_null(value: Any, pointer: str, reasons: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        reasons[pointer] = NON_FINITE_REASONS[repr(value)]
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{pointer}/{_pointer_token(k)}", reasons) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, f"{pointer}/{i}", reasons) for i, v in enumerate(value)]
    return value


def _pointer_token(key: str) -> str:
    """RFC 6901: "~" → "~0", "/" → "~1"."""
    return str(key).replace("~", "~0").replace("/", "~1")
