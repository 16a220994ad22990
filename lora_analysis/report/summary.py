"""Aggregates over per-module report entries: by layer, by projection type, rank savings.

Entries are the JSON-ready dicts of `schema.json#/$defs/module_report`; everything here is
plain arithmetic on them, so summaries of a saved report can be recomputed the same way.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from .grouping import model_order
from .types import GroupSummary, ModuleReport, Recommendation, Summary


def tau_key(tau: float) -> str:
    """JSON key of an energy threshold: the shortest decimal string of the float ("0.9")."""
    return repr(float(tau))


def recommended_parameters(entry: ModuleReport, tau: float) -> int:
    """Σ parameters of the module at its recommended rank: rank_τ·(d_in + d_out)."""
    d_out, d_in = entry["shape"]
    return entry["recommended_rank"][tau_key(tau)] * (d_in + d_out)


def group_summary(group: str, entries: Sequence[ModuleReport], taus: Sequence[float]) -> GroupSummary:
    """One row of a summary table (`schema.json#/$defs/group_summary`)."""
    n = len(entries)

    def mean(values: Iterable[float | None]) -> float | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    row: GroupSummary = {
        "group": group,
        "modules": n,
        "parameters": sum(e["parameters"] for e in entries),
        "frobenius_norm": math.sqrt(sum(e["frobenius_norm"] ** 2 for e in entries)),
        "mean_stable_rank": mean(e["stable_rank"] for e in entries) or 0.0,
        "mean_energy_effective_rank": mean(e["energy_effective_rank"] for e in entries) or 0.0,
        "mean_numerical_rank": mean(e["numerical_rank"] for e in entries) or 0.0,
        "mean_energy_rank": {tau_key(t): mean(e["energy_rank"][tau_key(t)] for e in entries) or 0.0 for t in taus},
        "recommended_parameters": {tau_key(t): sum(recommended_parameters(e, t) for e in entries) for t in taus},
    }
    bases = [e["base"] for e in entries if e["base"] is not None]
    if bases:
        row["mean_amplification"] = mean(b["amplification"] for b in bases)
        counts = [b["intruders"]["count"] for b in bases if b["intruders"] is not None]
        row["intruders"] = sum(counts) if counts else None
    return row


def summarize(entries: Mapping[str, ModuleReport], taus: Sequence[float]) -> Summary:
    """Overall, per-layer and per-projection summaries, groups in model order (layers by
    index, modules outside numbered layers last; projections q, k, v, qkv, o, mlp...)."""
    by_layer: dict[str, list[ModuleReport]] = {}
    by_projection: dict[str, list[ModuleReport]] = {}
    for name in sorted(entries, key=model_order):
        entry = entries[name]
        by_layer.setdefault(entry["layer"] if entry["layer"] is not None else "(none)", []).append(entry)
    for name in sorted(entries, key=lambda n: model_order(n)[1]):
        by_projection.setdefault(entries[name]["projection"], []).append(entries[name])
    return {
        "overall": group_summary("all", list(entries.values()), taus),
        "by_layer": [group_summary(layer, group, taus) for layer, group in by_layer.items()],
        "by_projection": [group_summary(kind, group, taus) for kind, group in by_projection.items()],
    }


def recommendation(entries: Mapping[str, ModuleReport], taus: Sequence[float]) -> list[Recommendation]:
    """Total parameters if every module were cut to its energy rank at τ, per τ."""
    total = sum(e["parameters"] for e in entries.values())
    rows: list[Recommendation] = []
    for tau in taus:
        kept = sum(recommended_parameters(e, tau) for e in entries.values())
        rows.append({
            "energy": float(tau),
            "parameters": total,
            "recommended_parameters": kept,
            "saving": total - kept,
            "saving_fraction": (total - kept) / total if total else 0.0,
        })
    return rows
