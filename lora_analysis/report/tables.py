"""The tables of a report, built once from the report dict and rendered as text or markdown.

Text is an aligned table for the terminal (numbers right-aligned); markdown is a GitHub pipe
table. The HTML page renders the same `Table` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..config import BASIS_DESCRIPTIONS
from ..errors import escaped
from .grouping import common_prefix
from .summary import tau_key
from .types import AnalyzeReport, CompareReport, GroupSummary, ModuleReport, PhiGrid, Recommendation, base_of

MISSING = "—"


@dataclass
class Table:
    """A titled table: `columns` headers, `rows` of already formatted cells, `numeric` marks
    right-aligned columns, `notes` lines printed under it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    notes: list[str] = field(default_factory=list)


def fmt(value: float | int | bool | None, digits: int = 4) -> str:
    """A number for a table: integers as is, floats to `digits` significant digits, None → —."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1000 else str(value)
    return f"{value:.{digits}g}"


def percent(tau: float) -> str:
    """0.9 → "90%", 0.995 → "99.5%"."""
    return f"{100 * tau:.4g}%"


# ---------------------------------------------------------------------------- analyze


def analyze_tables(report: AnalyzeReport) -> list[Table]:
    """Summary by projection and by layer, rank recommendation, per-module table, and the
    table against the base weights when the report has one."""
    taus = report["settings"]["energy_thresholds"]
    summary = report["summary"]
    with_base = report["base"] is not None
    tables = [
        _group_table("Summary by projection type", "projection", summary["by_projection"] + [summary["overall"]], taus, with_base),
        _group_table("Summary by layer", "layer", summary["by_layer"], taus, with_base),
        _recommendation_table(report["recommendation"]),
        _module_table(report, taus),
    ]
    if with_base:
        tables.append(_base_table(report))
    return tables


def _group_table(title: str, key: str, groups: Sequence[GroupSummary], taus: Sequence[float], with_base: bool) -> Table:
    columns = [key, "modules", "params", "‖ΔW‖_F", "stable rank", "energy eff. rank", "num. rank"]
    columns += [f"r@{percent(t)}" for t in taus]
    if with_base:
        columns += ["amplification", "intruders"]
    rows = []
    for g in groups:
        row = [g["group"], fmt(g["modules"]), fmt(g["parameters"]), fmt(g["frobenius_norm"]),
               fmt(g["mean_stable_rank"], 3), fmt(g["mean_energy_effective_rank"], 3),
               fmt(g["mean_numerical_rank"], 3)]
        row += [fmt(g["mean_energy_rank"][tau_key(t)], 3) for t in taus]
        if with_base:
            row += [fmt(g.get("mean_amplification"), 3), fmt(g.get("intruders"))]
        rows.append(row)
    notes = ["means over the group's modules; ‖ΔW‖_F = √Σ‖ΔW‖_F² over the group; r@τ = energy rank at τ"]
    return Table(title, columns, rows, [False] + [True] * (len(columns) - 1), notes)


def _recommendation_table(recommendation: Sequence[Recommendation]) -> Table:
    columns = ["energy kept", "params now", "params at recommended ranks", "saving", "saving %"]
    rows = [[percent(r["energy"]), fmt(r["parameters"]), fmt(r["recommended_parameters"]), fmt(r["saving"]),
             MISSING if r["saving_fraction"] is None else f"{100 * r['saving_fraction']:.1f}%"] for r in recommendation]
    notes = ["each module cut to the smallest rank keeping that share of its energy Σσ² (the r@τ columns)"]
    return Table("Rank recommendation", columns, rows, [False, True, True, True, True], notes)


def _module_table(report: AnalyzeReport, taus: Sequence[float]) -> Table:
    modules = report["modules"]
    components = any(m.get("component") for m in modules.values())
    columns = ["module", "shape", "r", "α", "scale", "‖ΔW‖_F", "σ₁", "stable rank", "Roy-Vetterli rank",
               "energy eff. rank", *[f"r@{percent(t)}" for t in taus], "num. rank", "kind"]
    columns += ["component"] if components else []
    randomized = any(m.get("svd", {}).get("method") == "randomized" for m in modules.values())
    columns += ["SVD"] if randomized else []
    rows = []
    for name, m in modules.items():
        bounds: dict = dict(m.get("svd", {}).get("intervals") or {})

        def cell(key: str, digits: int = 4, tau: str | None = None) -> str:
            value = m[key] if tau is None else m[key][tau]  # type: ignore[literal-required]
            interval = bounds.get("energy_rank", {}).get(tau) if tau is not None else bounds.get(key)
            return _interval(interval, digits) if value is None and interval else fmt(value, digits)

        row = [
            name, "×".join(map(str, m["shape"])), fmt(m["r"]),
            fmt(m["alpha"]) if m["alpha"] is not None else "unknown",
            fmt(m["scale"]) if m["scale"] is not None else "unknown",
            fmt(m["frobenius_norm"]), cell("sigma_max"), cell("stable_rank", 3),
            fmt(m["roy_vetterli_rank"], 3), fmt(m["energy_effective_rank"], 3),
            *[cell("recommended_rank", tau=tau_key(t)) for t in taus], cell("numerical_rank"),
            m["kind"] + (f" ({m['storage']})" if m["storage"] else ""),
        ]
        row += [m.get("component") or MISSING] if components else []
        rows.append(row + ([_svd_cell(m)] if randomized else []))
    settings, adapter = report["settings"], report["adapter"]
    title = "Modules"
    if settings["top"] is not None and settings["top"] < adapter["num_analyzed"]:
        title += f" (top {len(rows)} of {adapter['num_analyzed']} by ‖ΔW‖_F)"
    notes = ["r@τ: recommended rank, the smallest k with Σ_{i≤k}σ² ≥ τ·Σσ²; stable rank Σσ²/σ₁²; "
             "Roy-Vetterli rank exp(H(σ/Σσ)); energy eff. rank exp(H(σ²/Σσ²))",
             "kind: how ΔW is made from the file's tensors (lora s·B·A, adalora, tucker, loha, lokr, dora, "
             "dora-direction, dense); shape [d_out, d_in], conv kernels flattened per output channel"]
    if randomized:
        notes.append("SVD: exact (LAPACK), or randomized with a sketch of l columns and residual ‖E‖_F = ‖(I − QQᵀ)ΔW‖_F "
                     "(shown relative to ‖ΔW‖_F): every true σᵢ lies in [σᵢ(B), √(σᵢ(B)² + ‖E‖_F²)], so values it does "
                     "not pin down are shown as [low, high] intervals, and the entropy ranks, which need the whole "
                     "spectrum, as —; ‖ΔW‖_F is exact")
    extra = int(components) + int(randomized)
    numeric = [False, False] + [True] * (len(columns) - 2 - 1 - extra) + [False] * (1 + extra)
    return Table(title, columns, rows, numeric, notes)


def _interval(interval: Sequence[float | int | None], digits: int) -> str:
    """[low, high] of a bounded value (high None: unbounded)."""
    low, high = interval
    if high is None:
        return f"[{fmt(low, digits)}, ∞]"
    while digits < 12 and fmt(low, digits) == fmt(high, digits) and low != high:
        digits += 1  # enough digits to tell the ends apart
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def _svd_cell(module: ModuleReport) -> str:
    """Which SVD gave a module's spectrum, and its bound: "exact", or "randomized l=256, ‖E‖/‖ΔW‖ 3.1e-05"."""
    svd: dict = dict(module.get("svd") or {})  # absent in reports written before schema 2.1
    if svd.get("method", "exact") == "exact":
        return "exact"
    return f"randomized l={svd['sketch']}, ‖E‖/‖ΔW‖ {fmt(svd['relative_residual'], 2)}"


def _base_table(report: AnalyzeReport) -> Table:
    columns = ["module", "‖W‖_F", "‖ΔW‖_F", "‖UᵀWV‖ ΔW", "‖UᵀWV‖ W", "‖UᵀWV‖ random", "amplification",
               "φ_W(k, k)", "chance", "intruders"]
    rows = []
    for name, m in report["modules"].items():
        if m["base"] is None:  # a randomized spectrum without exact singular vectors (noted)
            continue
        b = base_of(m)
        proj = b["projection_norms"]
        k, phi_kk = _phi_weight_corner(b["phi_weight"])
        rows.append([
            name, fmt(b["weight_frobenius_norm"]), fmt(m["frobenius_norm"]), fmt(proj["delta"]),
            fmt(proj["weight"]), fmt(proj["random"]), fmt(b["amplification"], 3),
            fmt(phi_kk, 3), fmt(k / b["phi_weight"]["dim"] if k else None, 2),
            MISSING if b["intruders"] is None else f"{b['intruders']['count']}/{b['intruders']['top_k']}",
        ])
    settings = report["settings"]
    notes = [
        "‖UᵀWV‖_F with U, V the top-r singular vectors of ΔW, of W, or random orthonormal (paper Table 7); "
        "amplification = ‖ΔW‖_F / ‖UᵀWV‖_F (ΔW's U, V)",
        "φ_W(k, k): φ between the top-k left singular vectors of W and of ΔW (paper Figure 8), "
        "k = ΔW's numerical rank; chance = k/d",
    ]
    if settings["intruder_top_k"] is not None:
        notes.append(f"intruders: among the top-{settings['intruder_top_k']} singular vectors of W + ΔW, those with "
                     f"max |cos| < {fmt(settings['intruder_epsilon'])} against every singular vector of W")
    return Table("Against the base weights", columns, rows, [False] + [True] * (len(columns) - 1), notes)


def _phi_weight_corner(grid: PhiGrid) -> tuple[int, float | None]:
    """(k, φ(k, k)) at the largest unmasked diagonal entry of a φ grid; (0, None) if none."""
    phi = grid["phi"]
    for k in range(min(len(phi), len(phi[0]) if phi else 0), 0, -1):
        if phi[k - 1][k - 1] is not None:
            return k, phi[k - 1][k - 1]
    return 0, None


# ---------------------------------------------------------------------------- compare


def compare_tables(report: CompareReport) -> list[Table]:
    """Per module pair: ranks, φ(1,1), mean top-k diagonal, their chance levels, principal
    angles; plus the modules found in one adapter only."""
    top_k = report["settings"]["top_k"]
    columns = ["module", "r_a", "r_b", "d", "φ(1,1)", "chance", "mean φ(i,i) i≤k", "chance",
               "k", "smallest angle°", "largest angle°"]
    mixed = any(p["basis"] != report["basis"] for p in report["pairs"].values())
    columns += ["basis"] if mixed else []
    rows = []
    for name, p in report["pairs"].items():
        angles = p["principal_angles_deg"]
        rows.append([
            name if p["module_b"] == name else f"{name} ↔ {p['module_b']}",
            fmt(p["r_a"]), fmt(p["r_b"]), fmt(p["dim"]), fmt(p["phi_1_1"], 3), fmt(p["chance"]["phi_1_1"], 2),
            fmt(p["mean_top_k_diagonal"], 3), fmt(p["chance"].get("mean_top_k_diagonal"), 2), fmt(p["top_k"]),
            fmt(angles[0] if angles else None, 3), fmt(angles[-1] if angles else None, 3),
        ] + ([p["basis"]] if mixed else []))
    notes = [
        f"basis {report['basis']}: {BASIS_DESCRIPTIONS[report['basis']]}; φ(i, j) = ‖U_iᵀ V_j‖²_F / min(i, j) (paper Eq. 4)",
        (f"k = min({top_k}, numerical ranks)" if top_k else "k = the smaller numerical rank")
        + "; chance = expected φ of independent random subspaces, max(i, j)/d",
    ]
    tables = [Table("Subspace similarity φ per module", columns, rows,
                    [False] + [True] * (len(columns) - 1 - int(mixed)) + [False] * int(mixed), notes)]
    unmatched = [[name, "A only"] for name in report["only_in_a"]] + [[name, "B only"] for name in report["only_in_b"]]
    if unmatched:
        tables.append(Table("Modules in one adapter only", ["module", "present in"], unmatched, [False, False]))
    return tables


# ---------------------------------------------------------------------------- renderers


def render_text(title: str, header: Sequence[str], tables: Sequence[Table]) -> str:
    """Aligned plain-text tables for the terminal. Long module paths lose their common prefix,
    which is printed once above the table. Text from files (module names, paths) is `escaped`:
    a name cannot start a new line or send a terminal escape sequence."""
    out = [title, "=" * len(title), *map(escaped, header), ""]
    for table in tables:
        columns, notes = table.columns, [escaped(n) for n in table.notes]
        rows = [[escaped(cell) for cell in row] for row in table.rows]
        prefix = common_prefix([row[0] for row in rows]) if columns[0] == "module" else ""
        if prefix:
            rows = [[row[0][len(prefix):], *row[1:]] for row in rows]
            notes.insert(0, f"module paths relative to {prefix}")
        widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if num else c.ljust(w)
                             for c, w, num in zip(cells, widths, table.numeric)).rstrip()

        out += [table.title, "-" * len(table.title), line(columns), line(["-" * w for w in widths])]
        out += [line(row) for row in rows] or ["(none)"]
        out += [f"  {n}" for n in notes] + [""]
    return "\n".join(out)


def render_markdown(title: str, header: Sequence[str], tables: Sequence[Table]) -> str:
    """GitHub-flavoured markdown: a heading per table, pipe tables, notes as a list (text from
    files `escaped`, as in `render_text`)."""
    out = [f"# {title}", "", *(f"- {_md_cell(h)}" for h in header), ""]
    for table in tables:
        out += [f"## {table.title}", ""]
        out.append(markdown_table(table.columns, table.rows, table.numeric).rstrip("\n"))
        out += [""] + [f"*{_md_cell(n)}*  " for n in table.notes] + [""]
    return "\n".join(out)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[bool] | None = None) -> str:
    """A GitHub pipe table, one line per row, each line ending in a newline; `numeric`
    columns are right-aligned."""
    numeric = numeric or [False] * len(columns)
    lines = ["| " + " | ".join(_md_cell(str(c)) for c in columns) + " |"]
    lines.append("|" + "|".join("---:" if num else ":---" for num in numeric) + "|")
    lines += ["| " + " | ".join(_md_cell(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return escaped(text).replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def analyze_header(report: AnalyzeReport) -> list[str]:
    """Lines describing what was analyzed, shown above the tables."""
    adapter, settings = report["adapter"], report["settings"]
    lines = [f"adapter: {adapter['path']} ({adapter['format'] or 'unknown format'})"]
    if adapter.get("base_model_name_or_path"):
        lines.append(f"trained on: {adapter['base_model_name_or_path']}")
    selected = f"{adapter['num_analyzed']} of {adapter['num_modules']}" if adapter["num_analyzed"] != adapter["num_modules"] else str(adapter["num_modules"])
    lines.append(f"modules: {selected}" + (f" (matching {', '.join(settings['modules'])})" if settings["modules"] else "")
                 + f"; LoRA parameters: {fmt(adapter['num_parameters'])}")
    lines.append("update kinds: " + _kinds(adapter["kinds"]))
    if report["base"] is not None:
        lines.append(f"base weights: {report['base']['path']}")
    return lines + [f"note: {note}" for note in report["notes"]]


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{kind} ×{count}" for kind, count in kinds.items()) or "none"


def compare_header(report: CompareReport) -> list[str]:
    a, b = report["adapters"]["a"], report["adapters"]["b"]
    return [
        f"A: {a['path']} ({a['format'] or 'unknown format'}, {a['num_modules']} modules: {_kinds(a['kinds'])})",
        f"B: {b['path']} ({b['format'] or 'unknown format'}, {b['num_modules']} modules: {_kinds(b['kinds'])})",
        f"basis: {report['basis']}, the {BASIS_DESCRIPTIONS[report['basis']]}; {len(report['pairs'])} module pairs compared",
    ] + [f"note: {note}" for note in report["notes"]]
