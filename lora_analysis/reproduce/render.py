"""Render Section 7: figures (PNG + PDF), Table 7 and the rank table (markdown + CSV), the
paper's claims checked on this model, results.json and a README for the figures folder."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..fileio import atomic_write_text
from ..plots import PhiPanel, phi_figure, save_figure
from ..report.tables import markdown_table
from .section7 import TABLE7_RANKS, Section7

# Paper Table 7 (GPT-3 175B, layer 48, W_q) and Section 7 claims, for side-by-side numbers.
PAPER_TABLE7 = {
    4: {"delta": 0.32, "weight": 21.67, "random": 0.02, "delta_norm": 6.91},
    64: {"delta": 1.90, "weight": 37.71, "random": 0.33, "delta_norm": 3.57},
}
PAPER_WEIGHT_NORM = 61.95
PAPER_AMPLIFICATION = {4: 6.91 / 0.32, 64: 3.57 / 1.90}
# ΔW's top directions "not in W's top directions": they capture < 10 % of what W's own top-r
# directions do (paper: 1.5 % at r = 4, 5 % at r = 64).
NOT_TOP_RATIO = 0.1
WRITTEN_FORMATS = ("png", "pdf")  # of plots.FIGURE_FORMATS: PNG for the README, PDF for papers
PANEL_SIZE = 1.75  # inches: four panels fit a two-column paper width with 8-9 pt labels


def short(target: str) -> str:
    """"query" → "q", as in ΔW_q."""
    return {"query": "q", "key": "k", "value": "v", "dense": "o"}.get(target, target)


def tex(symbol: str, target: str) -> str:
    """Mathtext for a figure label: tex("ΔW", "query") → $\\Delta W_{q}$."""
    return "$" + symbol.replace("Δ", "\\Delta ") + "_{" + short(target) + "}$"


def render_all(s7: Section7, out: Path, command: str, progress: bool = True) -> dict:
    """Write every figure and table into `out`; returns the numbers (also in results.json)."""
    out.mkdir(parents=True, exist_ok=True)
    steps = [fig3, fig4, fig6, fig7, fig8]
    results: dict = {"layer": s7.runs.layer, "layers": s7.runs.layers, "targets": s7.targets}
    for step in tqdm(steps, desc="figures", unit="figure", disable=not progress):
        results[step.__name__] = step(s7, out)
    results["table7"] = table7(s7, out)
    results["rank_table"] = rank_table(s7, out)
    results["claims"] = claims(results)
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "README.md", readme(s7, results, command, out))
    return results


def _save(fig, out: Path, name: str) -> None:
    for fmt in WRITTEN_FORMATS:
        save_figure(fig, out / f"{name}.{fmt}")


def _phi_summary(comparison) -> dict:
    return {"phi_11": comparison.phi_11, "top_k_mean": comparison.top_k_mean, "top_k": comparison.top_k}


# Figures -------------------------------------------------------------------------------------
def fig3(s7: Section7, out: Path) -> dict:
    """φ(A_{r=8}, A_{r=64}) at one layer: full (8 × 64) and zoomed (8 × 8) panels."""
    layer, comparisons = s7.runs.layer, {t: s7.rank_comparison(t, s7.runs.layer) for t in s7.targets}
    full = [_rank_panel(c, tex("ΔW", t), c.grid) for t, c in comparisons.items()]
    zoom = [_rank_panel(c, tex("ΔW", t) + " ($i, j \\leq 8$)", c.grid[:8, :8]) for t, c in comparisons.items()]
    fig = phi_figure(full + zoom, ncols=len(full + zoom), panel_size=PANEL_SIZE,
                     suptitle=f"$\\phi(A_{{r=8}}, A_{{r=64}}, i, j)$, layer {layer}")
    _save(fig, out, "fig3")
    return {t: _phi_summary(c) for t, c in comparisons.items()}


def _rank_panel(comparison, title: str, grid: np.ndarray) -> PhiPanel:
    return PhiPanel(grid, title=title, xlabel="$j$  ($r = 64$)", ylabel="$i$  ($r = 8$)", dim=comparison.dim)


def fig4(s7: Section7, out: Path) -> dict:
    """φ(A_{r=64}, A'_{r=64}) between two seeds at one layer, and two random Gaussian matrices."""
    layer = s7.runs.layer
    comparisons = {t: s7.seed_comparison(t, layer) for t in s7.targets}
    a, b = s7.seeds
    panels = [_seed_panel(c, tex("ΔW", t)) for t, c in comparisons.items()]
    random = s7.random_grid(s7.targets[0], layer)
    dim = comparisons[s7.targets[0]].dim
    panels.append(PhiPanel(random, title="random Gaussian", xlabel="$j$", ylabel="$i$", dim=dim))
    fig = phi_figure(panels, ncols=len(panels), panel_size=PANEL_SIZE + 0.3,
                     suptitle=f"$\\phi(A_{{r=64}}, A'_{{r=64}}, i, j)$, seeds {a} and {b}, layer {layer}")
    _save(fig, out, "fig4")
    summary = {t: _phi_summary(c) | _shared_directions(c.grid) for t, c in comparisons.items()}
    summary["random"] = {"phi_11": float(random[0, 0]), "top_k_mean": float(np.mean(np.diag(random)[:8]))}
    return summary


def _seed_panel(comparison, title: str) -> PhiPanel:
    return PhiPanel(comparison.grid, title=title, xlabel="$j$  ($A'$, second seed)", ylabel="$i$  ($A$)", dim=comparison.dim)


def _shared_directions(grid: np.ndarray, threshold: float = 0.5) -> dict:
    """Leading directions two runs agree on: the largest k with φ(i, i) > threshold for all i ≤ k."""
    diagonal = np.nan_to_num(np.diag(grid), nan=0.0)
    below = np.flatnonzero(diagonal <= threshold)
    return {"shared_directions": int(below[0] if below.size else diagonal.size)}


def _per_layer(s7: Section7, out: Path, name: str, compare: Callable, panel: Callable, suptitle: str) -> dict:
    panels: list[PhiPanel] = []
    summary: dict[str, dict[str, dict]] = {}
    for layer in s7.runs.layers:
        for t in s7.targets:
            comparison = compare(t, layer)
            panels.append(panel(comparison, f"layer {layer}, " + tex("ΔW", t)))
            summary.setdefault(str(layer), {})[t] = _phi_summary(comparison) | _shared_directions(comparison.grid)
    fig = phi_figure(panels, ncols=2 * len(s7.targets), panel_size=PANEL_SIZE, suptitle=suptitle)
    _save(fig, out, name)
    return summary


def fig6(s7: Section7, out: Path) -> dict:
    """Figure 3 for every layer."""
    return _per_layer(s7, out, "fig6", s7.rank_comparison,
                      lambda c, title: _rank_panel(c, title, c.grid), "$\\phi(A_{r=8}, A_{r=64}, i, j)$, every layer")


def fig7(s7: Section7, out: Path) -> dict:
    """Figure 4 for every layer."""
    a, b = s7.seeds
    return _per_layer(s7, out, "fig7", s7.seed_comparison, _seed_panel,
                      f"$\\phi(A_{{r=64}}, A'_{{r=64}}, i, j)$, seeds {a} and {b}, every layer")


def fig8(s7: Section7, out: Path) -> dict:
    """φ between W_q's top-i and ΔW_q's top-j left singular vectors: r = 4, 8, 64 and random."""
    target, layer = s7.targets[0], s7.runs.layer
    grids = s7.weight_vs_delta(target, layer)
    dim = next(iter(grids.values())).shape[0]
    panels = [
        PhiPanel(grid, title=label if label == "random" else tex("ΔW", target) + f", ${label}$",
                 xlabel="$j$  (" + (tex("ΔW", target) if label != "random" else "random") + ")",
                 ylabel="$i$  (" + tex("W", target) + ")", dim=dim)
        for label, grid in grids.items()
    ]
    fig = phi_figure(panels, ncols=len(panels), panel_size=PANEL_SIZE,
                     suptitle=f"$\\phi(W_{{{short(target)}}}, \\Delta W_{{{short(target)}}}, i, j)$, layer {layer}")
    _save(fig, out, "fig8")
    # How much of ΔW's top direction lies in W's top-k directions, vs chance k/d.
    ks = [k for k in (1, 8, 32) if k <= dim]
    return {label: {f"phi_top{k}_vs_dw1": float(grid[k - 1, 0]) for k in ks} for label, grid in grids.items()} | {
        "chance": {f"phi_top{k}_vs_dw1": k / dim for k in ks}
    }


# Tables --------------------------------------------------------------------------------------
def table7(s7: Section7, out: Path) -> dict:
    """‖UᵀW_qV‖_F for ΔW_q's, W_q's and random top-r directions (paper Table 7), md + csv."""
    target, layer = s7.targets[0], s7.runs.layer
    norms = s7.projections(target, layer)
    q = short(target)
    header = ["", *(f"r={r}: {col}" for r in TABLE7_RANKS for col in (f"ΔW_{q}", f"W_{q}", "random"))]
    rows = [
        ["‖UᵀW_" + q + "V‖_F (this model)", *(f"{getattr(norms[r], col):.4g}" for r in TABLE7_RANKS for col in ("delta", "weight", "random"))],
        ["‖UᵀW_qV‖_F (paper, GPT-3)", *(f"{PAPER_TABLE7[r][col]:g}" for r in TABLE7_RANKS for col in ("delta", "weight", "random"))],
    ]
    norms_rows = [
        ["", "this model", "paper (GPT-3)"],
        [f"‖W_{q}‖_F", f"{norms[TABLE7_RANKS[0]].weight_norm:.4g}", f"{PAPER_WEIGHT_NORM:g}"],
        *([f"‖ΔW_{q}‖_F (r={r})", f"{norms[r].delta_norm:.4g}", f"{PAPER_TABLE7[r]['delta_norm']:g}"] for r in TABLE7_RANKS),
        *([f"amplification (r={r})", f"{norms[r].amplification:.3g}", f"{PAPER_AMPLIFICATION[r]:.3g}"] for r in TABLE7_RANKS),
    ]
    markdown = (
        f"Table 7 on this model: layer {layer}, W_{q} = `{target}`; U, V = top-r singular vectors of "
        f"ΔW_{q}, of W_{q}, or random orthonormal. Amplification = ‖ΔW_{q}‖_F / ‖UᵀW_{q}V‖_F (ΔW_{q}'s directions).\n\n"
        + markdown_table(header, rows) + "\n" + markdown_table(norms_rows[0], norms_rows[1:])
    )
    atomic_write_text(out / "table7.md", markdown)
    csv_rows: list[list[object]] = [["r", "directions", "projection_norm", "weight_norm", "delta_norm", "amplification"]]
    for r in TABLE7_RANKS:
        n = norms[r]
        for col, label in (("delta", "delta_w"), ("weight", "w"), ("random", "random")):
            csv_rows.append([r, label, getattr(n, col), n.weight_norm, n.delta_norm, n.amplification])
    atomic_write_text(out / "table7.csv", to_csv(csv_rows))
    return {str(r): vars(n) for r, n in norms.items()}


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
def claims(results: dict) -> list[dict]:
    """The paper's Section 7 claims, each with the measured value and whether it holds here."""
    targets = results["targets"]
    q, v = targets[0], targets[-1]
    fig3, fig7, t7 = results["fig3"], results["fig7"], results["table7"]
    out = []
    phi = {t: fig3[t]["phi_11"] for t in targets}
    out.append({
        "claim": "r = 8 and r = 64 adapters share their top direction: φ(A_8, A_64, 1, 1) > 0.5 (Fig. 3)",
        "paper": "> 0.5 for ΔW_q and ΔW_v (GPT-3, layer 48)",
        "measured": ", ".join(f"ΔW_{short(t)}: {phi[t]:.2f}" for t in targets),
        "holds": all(p > 0.5 for p in phi.values()),
    })
    if q != v:
        def overlap(t):  # mean over layers of the top-8 diagonal φ between seeds
            return float(np.mean([layer[t]["top_k_mean"] for layer in fig7.values()]))

        out.append({
            "claim": "ΔW_q has a higher intrinsic rank than ΔW_v: two seeds share more directions (Fig. 4)",
            "paper": "more common directions for ΔW_q than ΔW_v",
            "measured": f"mean φ(i, i), i ≤ 8, seed vs seed, over layers: ΔW_{short(q)} {overlap(q):.2f}, ΔW_{short(v)} {overlap(v):.2f}",
            "holds": overlap(q) > overlap(v),
        })
    amp = {r: t7[str(r)]["amplification"] for r in TABLE7_RANKS}
    out.append({
        "claim": "ΔW amplifies its directions more at low rank: amplification(r=4) > amplification(r=64) (Table 7)",
        "paper": f"{PAPER_AMPLIFICATION[4]:.1f} vs {PAPER_AMPLIFICATION[64]:.1f}",
        "measured": f"{amp[4]:.3g} vs {amp[64]:.3g}",
        "holds": bool(amp[4] > amp[64]),
    })
    r = TABLE7_RANKS[0]
    ratio = t7[str(r)]["delta"] / t7[str(r)]["weight"]
    above_random = t7[str(r)]["delta"] > t7[str(r)]["random"]
    out.append({
        "claim": f"ΔW is not in W's top directions but correlates with W more than random: "
                 f"‖UᵀWV‖ for ΔW's directions < {NOT_TOP_RATIO:g} × W's own, > random (r = {r})",
        "paper": f"{PAPER_TABLE7[r]['delta']} vs W {PAPER_TABLE7[r]['weight']} vs random {PAPER_TABLE7[r]['random']}",
        "measured": f"{t7[str(r)]['delta']:.3g} vs W {t7[str(r)]['weight']:.3g} vs random {t7[str(r)]['random']:.3g} (ratio {ratio:.3f})",
        "holds": bool(ratio < NOT_TOP_RATIO and above_random),
    })
    return out


# README --------------------------------------------------------------------------------------
def readme(s7: Section7, results: dict, command: str, out: Path) -> str:
    """The figures folder's README.md; embeds the tables already written into `out`."""
    config = s7.runs.config
    train = config.train_config()
    q, layer = short(s7.targets[0]), results["layer"]
    lines = [
        "# LoRA paper, Section 7, reproduced on this model",
        "",
        f"Generated by `{command}`: {config.model} + {config.data}, LoRA on "
        f"{{{', '.join(s7.targets)}}} and {{{s7.targets[0]}}}, ranks {list(config.ranks)}, seeds "
        f"{list(config.seeds)}, {train.steps} steps of batch {train.batch_size} at lr {train.learning_rate:g}. "
        f"Figures 3, 4, 8 and Table 7 use layer {layer} (the middle layer; the paper used layer 48 of 96).",
        "",
        "## The paper's claims on this model",
        "",
        markdown_table(["claim", "paper (GPT-3)", "this model", "holds here"],
                       [[c["claim"], c["paper"], c["measured"], "yes" if c["holds"] else "no"] for c in results["claims"]]),
        "## Figure 3: subspace similarity between ranks",
        "",
        "![fig3](fig3.png)",
        "",
        "## Figure 4: subspace similarity between seeds, and random",
        "",
        "![fig4](fig4.png)",
        "",
        "## Figure 8: ΔW against the pretrained W",
        "",
        "![fig8](fig8.png)",
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
        markdown_table(
            ["layer", *(f"φ₁₁ r8/r64 ΔW_{short(t)}" for t in s7.targets), *(f"shared dirs seeds ΔW_{short(t)}" for t in s7.targets)],
            [[layer_index, *(f"{results['fig6'][layer_index][t]['phi_11']:.2f}" for t in s7.targets),
              *(str(results["fig7"][layer_index][t]["shared_directions"]) for t in s7.targets)]
             for layer_index in results["fig6"]],
        ),
        "Shared directions: the largest k with φ(i, i) > 0.5 for every i ≤ k between the two seeds' r = 64 adapters.",
        "All numbers are in `results.json`; tables also as CSV.",
        "",
    ]
    return "\n".join(lines)


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

