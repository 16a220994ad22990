"""Render Section 7: figures (PNG + PDF), Table 7 and the rank table (markdown + CSV), the
paper's claims tested on this model (`claims`), results.json and a README for the folder.

Figure widths: Figures 3 and 4 are set for one column of a two-column paper (3.25 in),
Figures 6, 7 and 8 for the full text width (6.75 in); at those widths every text is ≥ 7 pt.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..analysis.nulls import phi_column_null
from ..errors import LoraAnalysisError
from ..fileio import atomic_write_text, read_json
from ..outputs import check_results_dir
from ..plots import COLUMN_WIDTH, TEXT_WIDTH, PhiPanel, PhiScale, phi_figure, save_figure
from ..report.tables import markdown_table
from .claims import PAPER_AMPLIFICATION, SHARED_TOP, section7_claims, shared_top
from .section7 import TABLE7_RANKS, Section7, short

# Paper Table 7 (GPT-3 175B, layer 48, W_q), for side-by-side numbers.
PAPER_TABLE7 = {
    4: {"delta": 0.32, "weight": 21.67, "random": 0.02, "delta_norm": 6.91},
    64: {"delta": 1.90, "weight": 37.71, "random": 0.33, "delta_norm": 3.57},
}
PAPER_WEIGHT_NORM = 61.95
WRITTEN_FORMATS = ("png", "pdf")  # of plots.FIGURE_FORMATS: PNG for the README, PDF for papers
FIGURES = ("fig3", "fig4", "fig6", "fig7", "fig8")
TABLES = ("table7", "table7_layers", "rank_table", "claims")
OUTPUT_FILES = (
    *(f"{name}.{fmt}" for name in FIGURES for fmt in WRITTEN_FORMATS),
    *(f"{name}.{ext}" for name in TABLES for ext in ("md", "csv")),
    "results.json", "README.md",
)
FIG8_PROBES = (1, 8, 32)  # φ(i, 1): how much of ΔW's top direction lies in W's top-i directions
DEFINITIONS = {
    "phi_11": "φ(1, 1): squared cosine between the two top directions",
    f"mean_phi_ii_top{SHARED_TOP}": f"mean of φ(i, i) over i = 1..{SHARED_TOP}",
    "chance": "expected φ of independent uniformly random subspaces, max(i, j)/d",
    "shared_directions": "largest k with φ(i, i) > 0.5 for every i ≤ k",
    "amplification": "‖ΔW‖_F / ‖UᵀWV‖_F, U, V the top-r singular vectors of ΔW; < 1: no amplification",
    "claims": "sign test of the per-unit values against the reference; CI: order-statistic interval of the "
              "median; null_pass_rate: P(the rule says holds | null)",
}


def render_all(s7: Section7, out: Path, command: str, progress: bool = True) -> dict:
    """Write every figure and table into `out`; returns the numbers (also in results.json).

    Writes (replacing) the files named in `OUTPUT_FILES`; `check_output_dir` decides
    beforehand whether `out` may be written.
    """
    out.mkdir(parents=True, exist_ok=True)
    config = s7.runs.config
    results: dict = {
        "reproduction": {"command": command, **output_record(config), "null_draws": s7.null_draws},
        "definitions": DEFINITIONS, "layer": s7.runs.layer, "layers": s7.runs.layers, "targets": s7.targets,
    }
    for step in tqdm([fig3, fig4, fig6, fig7, fig8], desc="figures", unit="figure", disable=not progress):
        results[step.__name__] = step(s7, out)
    results["table7"] = table7(s7, out)
    results["table7_layers"] = table7_layers(s7, out)
    results["rank_table"] = rank_table(s7, out)
    results["claims"] = [c.to_dict() for c in section7_claims(s7)]
    claims_table(results["claims"], out)
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "README.md", readme(s7, results, command, out))
    return results


def check_output_dir(out: Path, record: dict, force: bool = False) -> None:
    """Refuse to overwrite a user's files before any work starts (`outputs.check_results_dir`):
    `out` may hold a previous reproduction of the same model and data (`record`), never one
    that a quick run would replace, or none of `OUTPUT_FILES`. `force` writes anyway."""
    check_results_dir(out, record, _previous_reproduction, OUTPUT_FILES, "reproduction", force)


def output_record(config) -> dict:
    """What `check_output_dir` compares: the experiment a `ReproduceConfig` writes."""
    return {"model": str(config.model), "data": str(config.data), "quick": config.quick}


def _previous_reproduction(out: Path) -> dict | None:
    """The "reproduction" record of `out/results.json` when it was written by `render_all`
    (figures committed before that record existed count as a full run), else None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        results = read_json(path, "reproduction results")
    except LoraAnalysisError:
        return None
    if not isinstance(results, dict) or not {"claims", "table7"} <= results.keys():
        return None
    record = results.get("reproduction", {"quick": False})
    return record if isinstance(record, dict) else None


def _save(fig, out: Path, name: str) -> None:
    for fmt in WRITTEN_FORMATS:
        save_figure(fig, out / f"{name}.{fmt}")


def tex(symbol: str, target: str) -> str:
    """Mathtext for a figure label: tex("ΔW", "query") → $\\Delta W_{q}$."""
    return "$" + symbol.replace("Δ", "\\Delta ") + "_{" + short(target) + "}$"


def _phi_summary(grid: np.ndarray, dim: int) -> dict:
    """φ(1, 1) and the mean of φ(i, i) over i ≤ SHARED_TOP of a φ grid in Rᵈ, with their chance levels."""
    diagonal = np.diagonal(grid)[:SHARED_TOP]
    k = diagonal.size
    return {"phi_11": float(grid[0, 0]), f"mean_phi_ii_top{SHARED_TOP}": float(np.mean(diagonal)),
            "chance": {"phi_11": 1 / dim, f"mean_phi_ii_top{SHARED_TOP}": (k + 1) / 2 / dim}}


def _shared_directions(grid: np.ndarray, threshold: float = 0.5) -> dict:
    """Leading directions two runs agree on: the largest k with φ(i, i) > threshold for all i ≤ k."""
    diagonal = np.nan_to_num(np.diag(grid), nan=0.0)
    below = np.flatnonzero(diagonal <= threshold)
    return {"shared_directions": int(below[0] if below.size else diagonal.size)}


# Figures -------------------------------------------------------------------------------------
def fig3(s7: Section7, out: Path) -> dict:
    """φ(A_{r=8}, A_{r=64}) at one layer, first seed: full (8 × 64) and zoomed (8 × 8) panels."""
    layer, seed = s7.runs.layer, s7.seeds[0]
    comparisons = {t: s7.rank_comparison(t, layer) for t in s7.targets}
    band = s7.phi_band(next(iter(comparisons.values())).dim, 8, 64)
    full = [_rank_panel(c, tex("ΔW", t), c.grid, band) for t, c in comparisons.items()]
    zoom = [_rank_panel(c, tex("ΔW", t) + ", $i, j \\leq 8$", c.grid[:8, :8], band[:, :8, :8]) for t, c in comparisons.items()]
    fig = phi_figure(full + zoom, ncols=len(full), width=COLUMN_WIDTH, panel_aspect=0.8,
                     suptitle=f"$\\phi(A_{{r=8}}, A_{{r=64}}, i, j)$, layer {layer}, seed {seed}")
    _save(fig, out, "fig3")
    return {t: _phi_summary(c.grid, c.dim) for t, c in comparisons.items()}


def _rank_panel(comparison, title: str, grid: np.ndarray, band: np.ndarray) -> PhiPanel:
    return PhiPanel(grid, title=title, xlabel="$j$ ($r = 64$)", ylabel="$i$ ($r = 8$)", dim=comparison.dim, band=band)


def fig4(s7: Section7, out: Path) -> dict:
    """φ(A_{r=64}, A'_{r=64}) between two seeds at one layer, and two random Gaussian matrices:
    on the paper's 0–1 scale (top row) and relative to chance (bottom row)."""
    layer = s7.runs.layer
    comparisons = {t: s7.seed_comparison(t, layer) for t in s7.targets}
    a, b = s7.seeds
    dim = comparisons[s7.targets[0]].dim
    band = s7.phi_band(dim, 64, 64)
    random = s7.random_grid(s7.targets[0], layer)
    grids = [(tex("ΔW", t), c.grid) for t, c in comparisons.items()] + [("random", random)]
    panels = [PhiPanel(grid, title=title, xlabel=f"$j$ (seed {b})", ylabel=f"$i$ (seed {a})", dim=dim, band=band,
                       scale=scale)
              for scale in ("absolute", "relative") for title, grid in grids]
    fig = phi_figure(panels, ncols=len(grids), width=COLUMN_WIDTH,
                     suptitle=f"$\\phi(A_{{r=64}}, A'_{{r=64}}, i, j)$, layer {layer}")
    _save(fig, out, "fig4")
    summary = {t: _phi_summary(c.grid, c.dim) | _shared_directions(c.grid) for t, c in comparisons.items()}
    summary["random"] = _phi_summary(random, dim) | {"note": "one draw of two random Gaussian (64, d) matrices (the picture)"}
    return summary


def _per_layer(s7: Section7, compare, scale: PhiScale) -> tuple[list[PhiPanel], dict]:
    """One panel per (target, layer), targets as rows and layers as columns, and their summaries."""
    panels: list[PhiPanel] = []
    summary: dict[str, dict[str, dict]] = {}
    for t in s7.targets:
        for layer in s7.runs.layers:
            comparison = compare(t, layer)
            k1, k2 = comparison.grid.shape
            panels.append(PhiPanel(comparison.grid, title=f"layer {layer}, " + tex("ΔW", t), dim=comparison.dim,
                                   band=s7.phi_band(comparison.dim, k1, k2), scale=scale))
            summary.setdefault(str(layer), {})[t] = _phi_summary(comparison.grid, comparison.dim) | _shared_directions(comparison.grid)
    return panels, summary


def fig6(s7: Section7, out: Path) -> dict:
    """Figure 3 for every layer (first seed), on the paper's 0–1 scale."""
    panels, summary = _per_layer(s7, s7.rank_comparison, "absolute")
    for p in panels:
        p.xlabel, p.ylabel = "$j$ ($r = 64$)", "$i$ ($r = 8$)"
    fig = phi_figure(panels, ncols=len(s7.runs.layers), width=TEXT_WIDTH, panel_aspect=0.8,
                     suptitle=f"$\\phi(A_{{r=8}}, A_{{r=64}}, i, j)$, every layer, seed {s7.seeds[0]}")
    _save(fig, out, "fig6")
    return summary


def fig7(s7: Section7, out: Path) -> dict:
    """Figure 4 for every layer, relative to chance (the 0–1 scale leaves it dark: see Figure 4's top row)."""
    a, b = s7.seeds
    panels, summary = _per_layer(s7, s7.seed_comparison, "relative")
    for p in panels:
        p.xlabel, p.ylabel = f"$j$ (seed {b})", f"$i$ (seed {a})"
    fig = phi_figure(panels, ncols=len(s7.runs.layers), width=TEXT_WIDTH,
                     suptitle=f"$\\phi(A_{{r=64}}, A'_{{r=64}}, i, j)$ relative to chance, every layer")
    _save(fig, out, "fig7")
    return summary


def fig8(s7: Section7, out: Path) -> dict:
    """φ between W_q's top-i and ΔW_q's top-j left singular vectors (r = 4, 8, 64, random),
    on the paper's 0–1 scale and relative to chance."""
    target, layer = s7.targets[0], s7.runs.layer
    grids = s7.weight_vs_delta(target, layer)
    dim = next(iter(grids.values())).shape[0]
    q = short(target)
    panels = [
        PhiPanel(grid, title=f"random, $j \\leq {grid.shape[1]}$" if label == "random" else tex("ΔW", target) + f", ${label}$",
                 xlabel="$j$ (random)" if label == "random" else f"$j$ ($\\Delta W_{{{q}}}$)",
                 ylabel=f"$i$ ($W_{{{q}}}$)", dim=dim, band=s7.phi_band(dim, dim, grid.shape[1]), scale=scale)
        for scale in ("absolute", "relative") for label, grid in grids.items()
    ]
    fig = phi_figure(panels, ncols=len(grids), width=TEXT_WIDTH, panel_aspect=1.0,
                     suptitle=f"$\\phi(W_{{{q}}}, \\Delta W_{{{q}}}, i, j)$, layer {layer}, seed {s7.seeds[0]}")
    _save(fig, out, "fig8")
    probes = [i for i in FIG8_PROBES if i < dim]
    null = {str(i): {"mean": i / dim, "q025": float(phi_column_null(i, dim).ppf(0.025)),
                     "q975": float(phi_column_null(i, dim).ppf(0.975))} for i in probes}
    return {label: {f"phi_{i}_1": float(grid[i - 1, 0]) for i in probes} for label, grid in grids.items()} | {
        "null": null, "note": "φ(i, 1): share of ΔW's top direction in W's top-i directions; null: Beta(i/2, (d − i)/2)"}


# Tables --------------------------------------------------------------------------------------
def table7(s7: Section7, out: Path) -> dict:
    """‖UᵀW_qV‖_F for ΔW_q's, W_q's and random top-r directions at one layer (paper Table 7), md + csv.

    The random column is the distribution over `null_draws` Haar-random U, V (mean ± sd)."""
    target, layer = s7.targets[0], s7.runs.layer
    norms = s7.projections(target, layer)
    null = {r: s7.projection_null(target, layer, r) for r in TABLE7_RANKS}
    q = short(target)
    header = ["", *(f"r={r}: {col}" for r in TABLE7_RANKS for col in (f"ΔW_{q}", f"W_{q}", "random"))]
    rows = [
        [f"‖UᵀW_{q}V‖_F (this model)", *(cell for r in TABLE7_RANKS for cell in (
            f"{norms[r].delta:.4g}", f"{norms[r].weight:.4g}", f"{np.mean(null[r]):.3g} ± {np.std(null[r]):.2g}"))],
        ["‖UᵀW_qV‖_F (paper, GPT-3)", *(f"{PAPER_TABLE7[r][col]:g}" for r in TABLE7_RANKS for col in ("delta", "weight", "random"))],
    ]
    norms_rows = [
        ["", "this model", "paper (GPT-3)"],
        [f"‖W_{q}‖_F", f"{norms[TABLE7_RANKS[0]].weight_norm:.4g}", f"{PAPER_WEIGHT_NORM:g}"],
        *([f"‖ΔW_{q}‖_F (r={r})", f"{norms[r].delta_norm:.4g}", f"{PAPER_TABLE7[r]['delta_norm']:g}"] for r in TABLE7_RANKS),
        *([f"amplification (r={r})", f"{norms[r].amplification:.3g}", f"{PAPER_AMPLIFICATION[r]:.3g}"] for r in TABLE7_RANKS),
    ]
    below = [r for r in TABLE7_RANKS if norms[r].amplification < 1]
    markdown = (
        f"Table 7 on this model: layer {layer}, seed {s7.seeds[0]}, W_{q} = `{target}`; U, V = top-r singular vectors "
        f"of ΔW_{q}, of W_{q}, or Haar-random (mean ± sd over {s7.null_draws} draws). "
        f"Amplification = ‖ΔW_{q}‖_F / ‖UᵀW_{q}V‖_F for ΔW_{q}'s directions"
        + (f"; below 1 (r = {', '.join(map(str, below))}) ΔW_{q} is smaller than W_{q}'s component along its own "
           f"directions: it amplifies nothing there" if below else "")
        + ". Every layer and seed: `table7_layers.md`.\n\n"
        + markdown_table(header, rows) + "\n" + markdown_table(norms_rows[0], norms_rows[1:])
    )
    atomic_write_text(out / "table7.md", markdown)
    csv_rows: list[list[object]] = [["r", "directions", "projection_norm", "weight_norm", "delta_norm", "amplification"]]
    for r in TABLE7_RANKS:
        n = norms[r]
        csv_rows += [[r, "delta_w", n.delta, n.weight_norm, n.delta_norm, n.amplification],
                     [r, "w", n.weight, n.weight_norm, n.delta_norm, n.amplification],
                     [r, "random_mean", float(np.mean(null[r])), n.weight_norm, n.delta_norm, n.amplification],
                     [r, "random_sd", float(np.std(null[r])), n.weight_norm, n.delta_norm, n.amplification]]
    atomic_write_text(out / "table7.csv", to_csv(csv_rows))
    return {str(r): {"delta": norms[r].delta, "weight": norms[r].weight, "random_mean": float(np.mean(null[r])),
                     "random_sd": float(np.std(null[r])), "weight_norm": norms[r].weight_norm,
                     "delta_norm": norms[r].delta_norm, "amplification": norms[r].amplification}
            for r in TABLE7_RANKS}


def table7_layers(s7: Section7, out: Path) -> list[dict]:
    """Table 7 for every layer and seed: the units of claims (c) and (d), md + csv."""
    target = s7.targets[0]
    q = short(target)
    rows = []
    for layer, seed in s7.units:
        norms = s7.projections(target, layer, seed)
        for r in TABLE7_RANKS:
            null, n = s7.projection_null(target, layer, r), norms[r]
            rows.append({"layer": layer, "seed": seed, "r": r, "delta": n.delta, "weight": n.weight,
                         "random_mean": float(np.mean(null)), "random_sd": float(np.std(null)),
                         "random_p": float((1 + np.sum(null >= n.delta)) / (1 + null.size)),
                         "delta_norm": n.delta_norm, "amplification": n.amplification})
    columns = ["layer", "seed", "r", "delta", "weight", "random_mean", "random_sd", "random_p", "delta_norm", "amplification"]
    header = ["layer", "seed", "r", f"ΔW_{q} dirs", f"W_{q} dirs", "random (mean ± sd)", "P(random ≥ ΔW)",
              f"‖ΔW_{q}‖_F", "amplification"]
    body = [[row["layer"], row["seed"], row["r"], f"{row['delta']:.4g}", f"{row['weight']:.4g}",
             f"{row['random_mean']:.3g} ± {row['random_sd']:.2g}", f"{row['random_p']:.3g}",
             f"{row['delta_norm']:.4g}", f"{row['amplification']:.3g}"] for row in rows]
    markdown = (f"‖UᵀW_{q}V‖_F for every layer and seed (the units of claims (c) and (d)); random: {s7.null_draws} "
                f"Haar-random U, V; P(random ≥ ΔW): their share at or above ΔW_{q}'s directions (Monte Carlo p).\n\n"
                + markdown_table(header, body))
    atomic_write_text(out / "table7_layers.md", markdown)
    atomic_write_text(out / "table7_layers.csv", to_csv([columns] + [[row[c] for c in columns] for row in rows]))
    return rows


def rank_table(s7: Section7, out: Path) -> list[dict]:
    """Validation accuracy by rank r and target set (paper Table 6), md + csv."""
    rows = s7.rank_table()
    ranks = s7.runs.config.ranks
    seeds = s7.runs.config.seeds
    header = ["targets", *(f"r={r}" for r in ranks)]
    body = []
    for targets in s7.runs.config.target_sets:
        cells = {row["r"]: row for row in rows if row["targets"] == targets}
        body.append(["{" + ", ".join(f"W_{short(t)}" for t in targets) + "}",
                     *(f"{cells[r]['mean']:.3f} ± {cells[r]['spread']:.3f}" for r in ranks)])
    markdown = (
        f"Validation accuracy by LoRA rank r (mean ± half-range over seeds {list(seeds)}), "
        f"{s7.runs.config.data} on {s7.runs.config.model}.\n\n" + markdown_table(header, body)
    )
    atomic_write_text(out / "rank_table.md", markdown)
    csv_rows: list[list[object]] = [["targets", "r", *(f"seed{s}" for s in seeds), "mean", "spread"]]
    csv_rows += [["+".join(row["targets"]), row["r"], *row["accuracy"], row["mean"], row["spread"]] for row in rows]
    atomic_write_text(out / "rank_table.csv", to_csv(csv_rows))
    return rows


def to_csv(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([[significant(v) if isinstance(v, float) else v for v in row] for row in rows])
    return buffer.getvalue()


def significant(x: float, digits: int = 6) -> float:
    """`x` to the digits float32 analyses support. Same inputs and settings give identical
    files; another BLAS thread count moves float32 results around the 7th digit, which can
    still flip the 6th here and there."""
    return float(f"{float(x):.{digits}g}")


# Claims --------------------------------------------------------------------------------------
CLAIMS_HEADER = ["claim (paper)", "part", "value per unit", "n", "median [CI]", "sign test", "under the null", "verdict"]
CLAIMS_NOTE = (
    "Each part pools n units (layers × seeds), one value per unit, and tests the paper's direction with the exact "
    "sign test against the reference (units treated as independent; the layers of one training run are not "
    "strictly so): median with its distribution-free ≥ 95 % interval "
    "(order statistics), p two-sided. Verdict: holds when the interval lies on the claimed side, does not "
    "hold when it lies on the other, inconclusive when it contains the reference; holds trivially under "
    "the null when random directions pass the same rule with probability > 0.05. A claim holds when all its "
    "parts hold."
)


def claims_table(claims: list[dict], out: Path) -> None:
    """The verdicts (`Claim.to_dict()`s), one row per claim part, md + csv."""
    rows = []
    for claim in claims:
        for index, part in enumerate(claim["parts"]):
            first = index == 0
            rows.append([
                f"({claim['key']}) {claim['claim']} (paper: {claim['paper']})" if first else "",
                part["label"], part["statistic"], str(part["test"]["n"]), effect_text(part), test_text(part),
                f"{part['null']}; P(rule says holds) {_rate(part['null_pass_rate'])}",
                part["verdict"] + (f" (claim: {claim['verdict']})" if first and len(claim["parts"]) > 1 else ""),
            ])
    atomic_write_text(out / "claims.md", CLAIMS_NOTE + "\n\n" + markdown_table(CLAIMS_HEADER, rows))
    columns = ["n", "reference", "side", "claim_side", "other_side", "median", "ci_low", "ci_high", "ci_coverage", "p_value"]
    csv_rows = [["claim", "part", "verdict", "claim_verdict", *columns, "null_pass_rate"]]
    csv_rows += [[claim["key"], part["label"], part["verdict"], claim["verdict"], *(part["test"][c] for c in columns),
                  part["null_pass_rate"]] for claim in claims for part in claim["parts"]]
    atomic_write_text(out / "claims.csv", to_csv(csv_rows))


def effect_text(part: dict) -> str:
    """"median [low, high] (coverage)" and the numbers shown beside it."""
    t = part["test"]
    extra = "; ".join(f"{k} {_num(v)}" for k, v in part["extra"].items() if isinstance(v, float))
    return f"{_num(t['median'])} [{_num(t['ci_low'])}, {_num(t['ci_high'])}] ({t['ci_coverage']:.1%})" + (f"; {extra}" if extra else "")


def test_text(part: dict) -> str:
    """"units on the claimed side / n, relation, reference, p"."""
    t = part["test"]
    relation = ">" if t["side"] == "greater" else "<"
    return f"{t['claim_side']}/{t['n']} {relation} {_num(t['reference'])}, p = {format_p(t['p_value'])}"


def claim_lines(claims: list[dict]) -> list[str]:
    """Plain-text verdicts for the terminal (`Claim.to_dict()`s): one line per claim, one
    indented line per part."""
    lines = []
    for claim in claims:
        lines.append(f"{claim['verdict']}: ({claim['key']}) {claim['claim']}")
        lines += [f"    {part['label']}: {part['verdict']} — median {effect_text(part)}, sign test {test_text(part)}, "
                  f"P(holds | null) {_rate(part['null_pass_rate'])}" for part in claim["parts"]]
    return lines


def format_p(p: float) -> str:
    """p-values as a reader expects them: 0.039, 0.00024, "< 1e-300" for an underflow."""
    if p <= 0.0:
        return "< 1e-300"
    if p >= 0.1:
        return f"{p:.2f}"
    if p >= 0.001:
        return f"{p:.2g}"
    exponent = math.floor(math.log10(p))
    return f"{p / 10 ** exponent:.1f}e{exponent}"


def _rate(p: float) -> str:
    """"= 0.019" or "< 1e-300" after "P(...)"."""
    return "< 1e-300" if p <= 0.0 else f"= {p:.2g}"


def _num(x: float | None) -> str:
    """3 significant digits; an unbounded interval end (None in results.json) as ∞."""
    if x is None or not math.isfinite(x):
        return "−∞" if x is not None and x < 0 else "∞"
    return f"{x:.3g}"


# README --------------------------------------------------------------------------------------
def readme(s7: Section7, results: dict, command: str, out: Path) -> str:
    """The figures folder's README.md; embeds the tables already written into `out`."""
    config = s7.runs.config
    train = config.train_config()
    q, layer = short(s7.targets[0]), results["layer"]
    n_layers, n_seeds = len(s7.runs.layers), len(s7.seeds)
    lines = [
        "# LoRA paper, Section 7, reproduced on this model",
        "",
        f"Generated by `{command}`: {config.model} + {config.data}, LoRA on "
        f"{{{', '.join(s7.targets)}}} and {{{s7.targets[0]}}}, ranks {list(config.ranks)}, seeds "
        f"{list(config.seeds)}, {train.steps} steps of batch {train.batch_size} at lr {train.learning_rate:g}. "
        f"The verdicts pool all {n_layers} layers × {n_seeds} seeds; Figures 3, 4, 8 and Table 7 show layer {layer} "
        f"(the middle layer; the paper used layer 48 of 96). Random baselines: {s7.null_draws} Haar-random draws "
        f"or closed forms, never one draw.",
        "",
    ]
    if config.quick:
        lines += [f"**Quick run ({train.steps} steps per adapter): these adapters are barely trained, so the verdicts "
                  f"below describe them, not the paper's claims. Run without `--quick` for those.**", ""]
    lines += [
        "## The paper's claims, tested on this model",
        "",
        (out / "claims.md").read_text(),
        "## Figure 3: subspace similarity between ranks",
        "",
        "![fig3](fig3.png)",
        "",
        FIGURE_NOTE,
        "",
        "## Figure 4: subspace similarity between seeds, and random",
        "",
        "![fig4](fig4.png)",
        "",
        "Top row: the paper's 0–1 scale; bottom row: φ relative to its chance level max(i, j)/d on a log scale "
        "(white = chance, red = above, blue = below); contours as in Figure 3. The random panel is one draw of two "
        "random Gaussian matrices: what chance looks like.",
        "",
        "## Figure 8: ΔW against the pretrained W",
        "",
        "![fig8](fig8.png)",
        "",
        f"Top row: the paper's 0–1 scale; bottom row: relative to chance (white); contours as in Figure 3. "
        f"Rows i: W_{q}'s top-i left singular vectors; columns j: ΔW_{q}'s top-j (or a random j-subspace). "
        f"φ(i, 1), the share of ΔW_{q}'s top direction inside W_{q}'s top-i directions, against its null "
        f"Beta(i/2, (d − i)/2) [2.5 %, 97.5 %]: "
        + "; ".join(f"i = {i}: " + ", ".join(f"{label} {_num(results['fig8'][label][f'phi_{i}_1'])}"
                                          for label in results["fig8"] if label.startswith("r="))
                    + f" (null {_num(results['fig8']['null'][str(i)]['mean'])} "
                      f"[{_num(results['fig8']['null'][str(i)]['q025'])}, {_num(results['fig8']['null'][str(i)]['q975'])}])"
                    for i in map(int, results["fig8"]["null"])) + ".",
        "",
        f"## Table 7: ‖UᵀW_{q}V‖_F",
        "",
        (out / "table7.md").read_text(encoding="utf-8"),
        "## Table 6: accuracy by rank",
        "",
        (out / "rank_table.md").read_text(encoding="utf-8"),
        "## Every layer (Figures 6 and 7)",
        "",
        "![fig6](fig6.png)",
        "",
        "![fig7](fig7.png)",
        "",
        "Figure 7 is drawn relative to chance: on the 0–1 scale it is nearly uniform (Figure 4's top row shows that "
        "scale for one layer).",
        "",
        markdown_table(
            ["layer", *(f"φ₁₁(A_8, A_64) ΔW_{short(t)}, seeds {' / '.join(map(str, s7.seeds))}" for t in s7.targets),
             *(f"mean φ(i, i), i ≤ {SHARED_TOP}, seeds, ΔW_{short(t)}" for t in s7.targets),
             *(f"shared dirs, seeds, ΔW_{short(t)}" for t in s7.targets)],
            [[layer_index,
              *(" / ".join(f"{s7.rank_comparison(t, layer_index, seed).phi_11:.2f}" for seed in s7.seeds) for t in s7.targets),
              *(f"{shared_top(s7, t, layer_index):.3f}" for t in s7.targets),
              *(str(results["fig7"][str(layer_index)][t]["shared_directions"]) for t in s7.targets)]
             for layer_index in s7.runs.layers],
        ),
        f"φ₁₁(A_8, A_64): φ(1, 1) between the r = 8 and r = 64 adapters of one seed (chance 1/d). Mean φ(i, i), "
        f"i ≤ {SHARED_TOP}, between the two seeds' r = 64 adapters (chance {(SHARED_TOP + 1) / 2:g}/d). Shared dirs: "
        f"the largest k with φ(i, i) > 0.5 for every i ≤ k between the seeds.",
        "",
        "## Sizes",
        "",
        "Figures 3 and 4 are set for one column of a two-column paper (3.25 in wide), Figures 6, 7 and 8 for the "
        "full text width (6.75 in); at those widths no text is smaller than 7 pt. PDFs are vector with TrueType "
        "fonts embedded; PNGs are 300 dpi. All numbers are in `results.json` (`definitions` says what each key "
        "averages); tables also as CSV.",
        "",
    ]
    return "\n".join(lines)


FIGURE_NOTE = (
    "Colour: φ on the paper's 0–1 scale. Chance, max(i, j)/d, is given per panel: in its title, or below the panels "
    "when they all share it. White contours: where φ leaves the band of random subspaces, a simultaneous 99 % band "
    "(a pair of random subspaces crosses it somewhere in only 1 % of draws; solid: above it, dashed: below) — inside a "
    "solid contour the adapters share more than chance."
)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else significant(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x
