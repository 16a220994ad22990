"""Figures: φ heatmaps (paper Figures 3, 4, 6, 7, 8), singular-value spectra, per-layer heatmaps.

Every function builds on `matplotlib.figure.Figure` directly (no pyplot state, no global
backend switch, so notebooks keep their own backend); files are rendered by the Agg family
of canvases. Inputs are plain arrays and numbers, so the functions re-plot JSON reports too.

φ grids follow the paper's convention: row i = top-i directions of the first subspace, column
j = top-j of the second, φ(i, j) ∈ [0, 1] on a fixed 0–1 colour scale. Masked entries (NaN,
directions beyond the numerical rank) are drawn in grey.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .errors import LoraAnalysisError
from .fileio import atomic_path

PHI_CMAP = "viridis"
SPECTRUM_CMAP = "plasma"
MASKED_COLOR = "0.82"
FIGURE_FORMATS = ("png", "pdf", "svg")
MAX_PIXELS = 8000  # cap on the longer side of a raster figure with many panels


@dataclass
class PhiPanel:
    """One φ heatmap. phi: (n_i, n_j), rows i = top-i of `ylabel`'s subspace, columns j.

    `dim` is the ambient dimension d of the subspaces; it gives the chance level
    E[φ(i, j)] = max(i, j)/d for independent random subspaces.
    """

    phi: np.ndarray | Sequence[Sequence[float | None]]  # JSON rows work too (null: masked)
    title: str = ""
    xlabel: str = "j"
    ylabel: str = "i"
    dim: int | None = None


def _ticks(n: int, max_ticks: int = 5) -> np.ndarray:
    """1-based tick positions: every index up to 8, else about `max_ticks` at a round step
    (more would collide on a panel sized for a paper column)."""
    if n <= 8:
        return np.arange(1, n + 1)
    step = max(1, math.ceil(n / max_ticks))
    step = min((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128) if s >= step), default=step)
    return np.array([1, *range(step, n + 1, step)])


def draw_phi(ax, panel: PhiPanel, *, annotate_chance: bool = True):
    """Draw one φ heatmap on `ax` (0–1 colour range); returns the image for a colour bar."""
    phi = np.ma.masked_invalid(np.asarray(panel.phi, dtype=float))
    n_i, n_j = phi.shape
    cmap = _cmap(PHI_CMAP)
    image = ax.imshow(
        phi, cmap=cmap, norm=Normalize(0.0, 1.0), origin="upper", interpolation="nearest",
        extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5), aspect="auto",
    )
    ax.set_xticks(_ticks(n_j))
    ax.set_yticks(_ticks(n_i))
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.title:
        ax.set_title(panel.title, fontsize="small")
    if annotate_chance and panel.dim:
        top = max(n_i, n_j) / panel.dim
        text = f"chance ≤ {top:.2g}\n(max(i,j)/d, d={panel.dim})" if top < 0.5 else f"chance = max(i,j)/d\n(d={panel.dim})"
        ax.text(
            0.98, 0.02, text, transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
            bbox=dict(boxstyle="round,pad=0.25", facecolor="white", alpha=0.8, linewidth=0),
        )
    return image


def phi_figure(panels: Sequence[PhiPanel], *, ncols: int | None = None, suptitle: str | None = None,
               panel_size: float = 2.8) -> Figure:
    """Heatmaps of φ side by side with one shared 0–1 colour bar (paper Figures 3, 4, 6, 7, 8).

    The colour bar marks the largest chance level among the panels, max(i, j)/d, when it is
    below 0.5 (grids spanning most of R^d reach chance 1 in the corner).
    """
    if not panels:
        raise ValueError("phi_figure needs at least one panel")
    n = len(panels)
    ncols = ncols or (min(n, 4) if n <= 8 else math.ceil(math.sqrt(n * 1.5)))
    nrows = math.ceil(n / ncols)
    width, height = panel_size * ncols + 1.0, panel_size * nrows + (0.5 if suptitle else 0.1)
    fig = Figure(figsize=(width, height), layout="constrained", dpi=_dpi(width, height))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    images = [draw_phi(ax, panel) for ax, panel in zip(axes, panels)]
    for ax in axes[n:]:
        ax.set_visible(False)
    cbar = fig.colorbar(images[-1], ax=axes[:n].tolist(), shrink=min(1.0, 0.9 if nrows > 1 else 1.0))
    cbar.set_label("φ(i, j)")
    chances = [max(np.asarray(p.phi, dtype=float).shape) / p.dim for p in panels if p.dim]
    if chances and max(chances) < 0.5:  # a mark near the top of the bar would say nothing
        level = max(chances)
        cbar.ax.axhline(level, color="white", linewidth=1.5)
        cbar.ax.axhline(level, color="black", linewidth=0.8, linestyle="--")
        cbar.ax.text(-0.15, level, "chance ", transform=cbar.ax.get_yaxis_transform(), va="center", ha="right",
                     fontsize="x-small")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def compare_figure(report: Mapping, *, reference: np.ndarray | None = None, prefix: str = "") -> Figure:
    """φ heatmap of every module pair of a `compare` report (dict or parsed JSON), paper
    Figures 3/4.

    reference: a φ grid of two random subspaces (Figure 4, third panel), drawn last with the
        first pair's dimension d. prefix: the module paths' common prefix, dropped from the
        panel titles and shown once in the suptitle. `report.compare_figure` supplies both.
    """
    pairs = report["pairs"]
    panels = [
        PhiPanel(np.array(pair["phi"], dtype=float), title=name[len(prefix):], dim=pair["dim"],
                 xlabel=f"j (adapter B, r={pair['r_b']})", ylabel=f"i (adapter A, r={pair['r_a']})")
        for name, pair in pairs.items()
    ]
    if reference is not None and panels:
        (n_i, n_j), dim = np.shape(reference), panels[0].dim
        panels.append(PhiPanel(np.asarray(reference, dtype=float), title=f"random subspaces (d={dim})",
                               xlabel=f"j (random, {n_j} dims)", ylabel=f"i (random, {n_i} dims)", dim=dim))
    suptitle = f"Subspace similarity φ(i, j), basis {report['basis']}" + (f" — {prefix}*" if prefix else "")
    return phi_figure(panels, suptitle=suptitle)


def spectra_figure(spectra: Mapping[str, Sequence[Mapping]], *, normalize: bool = True,
                   logy: bool = True, panel_size: float = 3.2) -> Figure:
    """Singular values of ΔW, one panel per group (projection type), one line per module.

    spectra: group -> list of {"label": str, "layer": int | None, "values": σ (descending)}.
    Lines are coloured by layer (colour bar); `normalize` divides by σ₁ so modules of
    different scale share an axis.
    """
    groups = [(g, items) for g, items in spectra.items() if items]
    if not groups:
        raise ValueError("spectra_figure needs at least one non-empty group")
    ncols = min(len(groups), 4)
    nrows = math.ceil(len(groups) / ncols)
    width, height = panel_size * ncols + 1.0, panel_size * 0.8 * nrows + 0.4
    fig = Figure(figsize=(width, height), layout="constrained", dpi=_dpi(width, height))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=normalize)).ravel()
    layers = [item["layer"] for _, items in groups for item in items if item.get("layer") is not None]
    norm = Normalize(min(layers), max(max(layers), min(layers) + 1)) if layers else None
    cmap = _cmap(SPECTRUM_CMAP)
    for ax, (group, items) in zip(axes, groups):
        plotted = False
        for item in items:
            values = np.asarray(item["values"], dtype=float)
            if not values.size or values[0] <= 0:
                continue  # ΔW = 0: nothing to draw (and nothing a log axis could show)
            if normalize:
                values = values / values[0]
            index = np.arange(1, values.size + 1)
            if logy:  # zeros beyond the rank cannot sit on a log axis
                index, values = index[values > 0], values[values > 0]
            color = cmap(norm(item["layer"])) if norm is not None and item.get("layer") is not None else "0.3"
            ax.plot(index, values, marker="o", markersize=2.5, linewidth=1.0, color=color, label=item.get("label"))
            plotted = True
        if logy and plotted:
            ax.set_yscale("log")
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("index k")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("σ_k / σ_1" if normalize else "σ_k")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if norm is not None:
        from matplotlib.cm import ScalarMappable

        from matplotlib.ticker import MaxNLocator

        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[: len(groups)].tolist())
        cbar.locator = MaxNLocator(integer=True)
        cbar.update_ticks()
        cbar.set_label("layer")
    fig.suptitle("Singular values of ΔW = s·B·A")
    return fig


def layer_heatmap(values: Mapping[tuple[str, str], float | None], *, rows: Sequence[str], columns: Sequence[str],
                  title: str, label: str, cmap: str = "viridis", log: bool = False,
                  annotate: bool | None = None, fmt: str = "{:.3g}") -> Figure:
    """Heatmap of one metric with projection types as rows and layers as columns.

    values: (row, column) -> value; missing cells are grey. `log` uses a log colour scale
    for values spanning more than a factor 10 (amplification factors can span orders of
    magnitude). Cells are annotated when the grid is small enough to read.
    """
    grid = np.full((len(rows), len(columns)), np.nan)
    for (row, col), value in values.items():
        if value is not None and np.isfinite(value):
            grid[rows.index(row), columns.index(col)] = value
    width = min(1.0 + 0.45 * len(columns) + 1.6, 24.0)
    height = 1.2 + 0.42 * len(rows)
    fig = Figure(figsize=(max(width, 4.0), max(height, 2.2)), layout="constrained")
    ax = fig.subplots()
    finite = grid[np.isfinite(grid)]
    norm: Normalize
    if log and finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
        from matplotlib.colors import LogNorm

        norm = LogNorm(finite.min(), finite.max())
        label += " (log scale)"
    else:
        norm = Normalize(finite.min() if finite.size else 0.0, finite.max() if finite.size else 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=_cmap(cmap), norm=norm, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns, rotation=90 if max(map(len, columns), default=0) > 3 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("layer")
    ax.set_ylabel("projection")
    ax.set_title(title, fontsize="medium")
    if annotate is None:
        annotate = len(columns) <= 24 and len(rows) <= 12
    if annotate:
        for (r, c), value in np.ndenumerate(grid):
            if np.isfinite(value):
                shade = norm(value)
                ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize="x-small",
                        color="black" if shade > 0.5 else "white")
    fig.colorbar(image, ax=ax).set_label(label)
    return fig


def rank_curve_figure(ranks: Sequence[int], energy_kept: Sequence[float], *, metric: Sequence[float] | None = None,
                      metric_label: str | None = None, reference: float | None = None) -> Figure:
    """The rank curve of `resize --sweep-ranks`: energy kept (fraction, 0–1) against rank k on a
    log₂ axis and, when given, the validation `metric` of each rank's adapter on a second axis,
    with the original adapter's value `reference` as a dashed line."""
    if len(ranks) != len(energy_kept) or (metric is not None and len(metric) != len(ranks)):
        raise ValueError("rank_curve_figure: ranks, energy_kept and metric must have one value per rank")
    fig = Figure(figsize=(5.0, 3.4), layout="constrained", dpi=_dpi(5.0, 3.4))
    ax = fig.subplots()
    ax.plot(ranks, np.asarray(energy_kept, dtype=float), marker="o", color="tab:blue", label="energy kept")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(k) for k in ranks])
    ax.minorticks_off()
    ax.set_xlabel("rank k")
    ax.set_ylabel("energy kept Σσ²(k) / Σσ²", color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if metric is not None:
        right = ax.twinx()
        right.plot(ranks, np.asarray(metric, dtype=float), marker="s", color="tab:red", label=metric_label)
        if reference is not None:
            right.axhline(reference, color="tab:red", linestyle="--", linewidth=1.0, label=f"original {metric_label}")
        right.set_ylabel(metric_label or "metric", color="tab:red")
        right.legend(loc="lower right", fontsize="small")
    fig.suptitle("Resized adapter against rank")
    return fig


def figure_bytes(fig: Figure, fmt: str = "png", dpi: float | None = None) -> bytes:
    """The figure rendered to `fmt` (png, pdf, svg) in memory."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi or fig.dpi, bbox_inches="tight",
                metadata=_reproducible_metadata(fmt))
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float | None = None) -> None:
    """Write the figure atomically; the format comes from the extension (.png, .pdf, .svg)."""
    fmt = figure_format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi or fig.dpi, bbox_inches="tight",
                    metadata=_reproducible_metadata(fmt))


def figure_format(path: str | os.PathLike) -> str:
    """Image format named by the path's extension; LoraAnalysisError for anything else."""
    fmt = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise LoraAnalysisError(f"{os.fspath(path)}: unsupported figure format {fmt or '(none)'!r}; "
                         f"use one of {', '.join('.' + f for f in FIGURE_FORMATS)}")
    return fmt


def _reproducible_metadata(fmt: str) -> dict:
    """No timestamps in the file, so figures committed to the repository diff cleanly."""
    return {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None},
            "svg": {"Date": None}}.get(fmt, {})


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=MASKED_COLOR)


def _dpi(width_in: float, height_in: float, preferred: float = 150.0) -> float:
    """Preferred resolution, lowered so a figure with many panels stays under MAX_PIXELS."""
    return min(preferred, MAX_PIXELS / max(width_in, height_in))
