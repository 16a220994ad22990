"""The rows a scan writes for one adapter: one per module, then one summarizing the adapter, or
a single error row when the adapter cannot be read or analysed.

Every value comes from the `analyze` report of the adapter (`report.analyze_report`), the one
home of per-module numbers, so a scan row and `lora-analysis analyze --format json` agree.
Values are str, int, finite float, or None (empty in CSV, null in JSON); never NaN or Inf.

Columns (`COLUMNS`):
    adapter, format, row ("module" | "adapter" | "error"), module, kind (update kind), d_out, d_in, r,
    alpha, scale (None where α is unknown), parameters, frobenius_norm ‖ΔW‖_F, sigma_max σ₁,
    stable_rank, roy_vetterli_rank, energy_effective_rank, energy_rank_<τ>, numerical_rank;
    adapter rows: modules, parameters (Σ), frobenius_norm (√Σ‖ΔW_i‖²_F), sigma_max (max),
    mean_stable_rank, mean_energy_effective_rank, mean_numerical_rank,
    recommended_parameters_<τ> (Σ over modules of rank_τ·(d_in + d_out)), notes;
    error rows: error (one line).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Mapping

from ..errors import LoraAnalysisError, shown
from .discover import FoundAdapter

TAUS = (0.9, 0.99)
Row = dict[str, Any]
Kind = Callable[[Any], Any]  # the column's type: str, int or float (values may also be None)


def _tau_columns(prefix: str) -> list[tuple[str, Kind]]:
    return [(f"{prefix}_{t!r}", int) for t in TAUS]


COLUMNS: list[tuple[str, Kind]] = [
    ("adapter", str), ("format", str), ("row", str), ("module", str), ("kind", str),
    ("d_out", int), ("d_in", int), ("r", int), ("alpha", float), ("scale", float),
    ("parameters", int), ("frobenius_norm", float), ("sigma_max", float), ("stable_rank", float),
    ("roy_vetterli_rank", float), ("energy_effective_rank", float), *_tau_columns("energy_rank"),
    ("numerical_rank", int), ("modules", int), ("mean_stable_rank", float),
    ("mean_energy_effective_rank", float), ("mean_numerical_rank", float),
    *_tau_columns("recommended_parameters"), ("notes", str), ("error", str),
]
COLUMN_NAMES = [name for name, _ in COLUMNS]
FINAL_ROWS = ("adapter", "error")  # the last row of an adapter's block: it is complete


def adapter_rows(found: FoundAdapter, device: str = "auto") -> list[Row]:
    """The rows of one adapter (module rows in model order, then its adapter row), or one error
    row naming the problem. Never raises for a bad adapter; warnings become the adapter's notes."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = _analyze(found.path, device)
    except LoraAnalysisError as err:
        return [error_row(found.name, str(err))]
    except Exception as err:  # noqa: BLE001 - a bug or a resource limit: say which, and scan on
        return [error_row(found.name, f"unexpected error ({type(err).__name__}): {shown(err, 300)}")]
    # The report's notes say everything the Adapter's "alpha unknown" warning says, in its words.
    warned = [shown(w.message, 300) for w in caught if not str(w.message).startswith("LoRA alpha unknown")]
    notes = list(dict.fromkeys([*report["notes"], *warned]))
    return module_rows(found.name, report) + [summary_row(found.name, report, notes)]


def _analyze(path: os.PathLike, device: str) -> Mapping[str, Any]:
    from ..adapters import load_adapter
    from ..analysis import AnalysisOptions, analyze_adapter
    from ..report import analyze_report

    # Lazy modules, vectors dropped once analysed: the adapter's memory is one module at a time.
    adapter = load_adapter(path, lazy=True)
    options = AnalysisOptions(taus=TAUS, device=device, keep_vectors=False)
    analysis = analyze_adapter(adapter, options=options, progress=False)
    return analyze_report(analysis, adapter)


def module_rows(name: str, report: Mapping[str, Any]) -> list[Row]:
    """One row per module of an `analyze` report (its `modules`, in order)."""
    fmt = report["adapter"]["format"]
    rows = []
    for module, entry in report["modules"].items():
        d_out, d_in = entry["shape"]
        rows.append(row(
            adapter=name, format=fmt, row="module", module=module, kind=entry.get("kind", "lora"),
            d_out=d_out, d_in=d_in, r=entry["r"], alpha=entry["alpha"], scale=entry["scale"],
            parameters=entry["parameters"], frobenius_norm=entry["frobenius_norm"], sigma_max=entry["sigma_max"],
            stable_rank=entry["stable_rank"], roy_vetterli_rank=entry["roy_vetterli_rank"],
            energy_effective_rank=entry["energy_effective_rank"], numerical_rank=entry["numerical_rank"],
            **{f"energy_rank_{t!r}": entry["energy_rank"][repr(t)] for t in TAUS},
        ))
    return rows


def summary_row(name: str, report: Mapping[str, Any], notes: list[str]) -> Row:
    """The adapter row: totals and means over its modules (`summary.overall` of the report)."""
    overall = report["summary"]["overall"]
    saved = {r["energy"]: r["recommended_parameters"] for r in report["recommendation"]}
    sigmas = [e["sigma_max"] for e in report["modules"].values()]
    return row(
        adapter=name, format=report["adapter"]["format"], row="adapter", modules=report["adapter"]["num_modules"],
        parameters=report["adapter"]["num_parameters"], frobenius_norm=overall["frobenius_norm"],
        sigma_max=max(sigmas, default=None), mean_stable_rank=overall["mean_stable_rank"],
        mean_energy_effective_rank=overall["mean_energy_effective_rank"],
        mean_numerical_rank=overall["mean_numerical_rank"],
        notes=" | ".join(notes) or None,
        **{f"recommended_parameters_{t!r}": saved[t] for t in TAUS},
    )


def error_row(name: str, message: str) -> Row:
    return row(adapter=name, row="error", error=message)


def row(**values: Any) -> Row:
    """A full row: every column, in order, missing ones None; each value checked and converted
    to its column's type (a non-finite float is a bug upstream: refused, never written)."""
    unknown = set(values) - set(COLUMN_NAMES)
    if unknown:
        raise ValueError(f"not scan columns: {sorted(unknown)}")
    return {name: _typed(name, kind, values.get(name)) for name, kind in COLUMNS}


def _typed(name: str, kind: Kind, value: Any) -> Any:
    if value is None:
        return None
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"scan column {name}: {value} is not a finite number")
        return value
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"scan column {name}: {value} is not an integer")
        return int(value)
    return str(value)
