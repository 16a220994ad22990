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


def recommended_parameters(entry: ModuleReport, tau: float) -> int | None:
    """Σ parameters of the module at its recommended rank: rank_τ·(d_in + d_out) (None where a
    randomized SVD leaves the rank open)."""
    d_out, d_in = entry["shape"]
    rank = entry["recommended_rank"][tau_key(tau)]
    return None if rank is None else rank * (d_in + d_out)


def exact_sum(values: Iterable[int | None]) -> int | None:
    """Σ values, or None when one is None (undetermined: a sum without it would be wrong)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def group_summary(group: str, entries: Sequence[ModuleReport], taus: Sequence[float]) -> GroupSummary:
    """One row of a summary table (`schema.json#/$defs/group_summary`)."""
    n = len(entries)

    def mean(values: Iterable[float | None]) -> float | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    def exact_mean(values: Iterable[float | None]) -> float | None:
        """The mean, or None when a randomized SVD left a module's value undetermined."""
        values = list(values)
        if any(v is None and e.get("svd", {}).get("intervals") is not None for v, e in zip(values, entries)):
            return None
        return mean(values) or 0.0

    row: GroupSummary = {
        "group": group,
        "modules": n,
        "parameters": sum(e["parameters"] for e in entries),
        "frobenius_norm": math.hypot(*(e["frobenius_norm"] for e in entries)),  # no overflow of the squares
        "mean_stable_rank": exact_mean((e["stable_rank"] for e in entries)),
        "mean_energy_effective_rank": exact_mean((e["energy_effective_rank"] for e in entries)),
        "mean_numerical_rank": exact_mean((e["numerical_rank"] for e in entries)),
        "mean_energy_rank": {tau_key(t): exact_mean((e["energy_rank"][tau_key(t)] for e in entries))
                             for t in taus},
        "recommended_parameters": {tau_key(t): exact_sum(recommended_parameters(e, t) for e in entries) for t in taus},
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
        kept = exact_sum(recommended_parameters(e, tau) for e in entries.values())
        rows.append({
            "energy": float(tau),
            "parameters": total,
            "recommended_parameters": kept,
            "saving": None if kept is None else total - kept,
            "saving_fraction": None if kept is None else (total - kept) / total if total else 0.0,
        })
    return rows
