"""Figures: φ heatmaps (paper Figures 3, 4, 6, 7, 8), singular-value spectra, per-layer heatmaps.

Every function builds on `matplotlib.figure.Figure` directly (no pyplot state, no global
backend switch, so notebooks keep their own backend); files are rendered by the Agg family
of canvases. Inputs are plain arrays and numbers, so the functions re-plot JSON reports too.

φ grids follow the paper's convention: row i = top-i directions of the first subspace, column
j = top-j of the second. A panel is drawn on the paper's fixed 0–1 scale ("absolute") or as
φ relative to its chance level on a log scale ("relative": white = chance), which shows
structure that the 0–1 scale leaves dark. Chance is drawn per panel: its level in the title
and, when the caller gives the band of random subspaces, contours where φ leaves it. Masked
entries (NaN, directions beyond the numerical rank) are grey.

Sizes are set for the width a figure is printed at (`COLUMN_WIDTH`, `TEXT_WIDTH`): every
text is ≥ 7 pt at that width, and PDFs embed their fonts (TrueType) as vector text.

Text arguments are matplotlib text, where `$...$` is mathtext markup (the reproduction's
labels use it). Text that comes from data — module names, layer labels, paths — is never
markup: callers pass it through `plain_text`, so a name such as `$\\frac$` is drawn as written
instead of failing to parse or being typeset.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

from .errors import LoraAnalysisError, escaped
from .fileio import atomic_path

PHI_CMAP = "viridis"
RELATIVE_CMAP = "RdBu_r"
SPECTRUM_CMAP = "plasma"
MASKED_COLOR = "0.82"
FIGURE_FORMATS = ("png", "pdf", "svg")
MAX_PIXELS = 8000  # cap on the longer side of a raster figure with many panels

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper
TEXT_WIDTH = 6.75  # inches: the full text width of a two-column paper
TICK_PT = 7.0  # the smallest text anywhere: tick labels, notes, legends
LABEL_PT = 7.5  # axis and colour-bar labels, panel titles
SUPTITLE_PT = 8.5

PhiScale = Literal["absolute", "relative"]


def plain_text(text: str) -> str:
    """`text` drawn literally by matplotlib: control characters `escaped` (no font has glyphs
    for them) and every `$` escaped, so no part of it is mathtext."""
    return escaped(text).replace("$", r"\$")


@dataclass
class PhiPanel:
    """One φ heatmap. phi: (n_i, n_j), rows i = top-i of `ylabel`'s subspace, columns j.

    chance: expected φ of independent random subspaces, same shape (default max(i, j)/d from
    `dim`, the ambient dimension d); band: (2, n_i, n_j) low and high edges of φ for random
    subspaces (a simultaneous band: a random grid leaves it in 1 % of draws), drawn as contours
    where φ leaves it (solid: above, dashed: below); scale:
    "absolute" (0–1) or "relative" (log₂ of φ / chance).
    """

    phi: np.ndarray | Sequence[Sequence[float | None]]  # JSON rows work too (null: masked)
    title: str = ""
    xlabel: str = "j"
    ylabel: str = "i"
    dim: int | None = None
    chance: np.ndarray | None = None
    band: np.ndarray | None = None
    scale: PhiScale = "absolute"

    def chance_grid(self) -> np.ndarray | None:
        if self.chance is not None:
            return np.asarray(self.chance, dtype=float)
        if not self.dim:
            return None
        n_i, n_j = np.asarray(self.phi, dtype=float).shape
        return np.maximum(np.arange(1, n_i + 1)[:, None], np.arange(1, n_j + 1)[None, :]) / self.dim


def _ticks(n: int, max_ticks: int = 5) -> np.ndarray:
    """1-based tick positions: every index up to 8, else about `max_ticks` at a round step
    (more would collide on a panel sized for a paper column)."""
    if n <= 8:
        return np.arange(1, n + 1)
    step = max(1, math.ceil(n / max_ticks))
    step = min((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128) if s >= step), default=step)
    return np.array([1, *range(step, n + 1, step)])


def _relative(panel: PhiPanel) -> np.ndarray:
    """log₂(φ / chance); φ = 0 gives -inf (clipped by the colour scale)."""
    chance = panel.chance_grid()
    if chance is None:
        raise LoraAnalysisError("a relative φ panel needs its chance level (chance= or dim=)")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2(np.asarray(panel.phi, dtype=float) / chance)


def _relative_limit(panels: Sequence[PhiPanel]) -> float:
    """Symmetric limit of the relative scale, in powers of 2 from 1 to 8: the 99th percentile of
    |log₂(φ / chance)| rounded up (a few extreme cells, e.g. φ(1, 1) of a shared direction, must
    not wash out the rest; they saturate instead)."""
    values = np.concatenate([_relative(p).ravel() for p in panels])
    finite = np.abs(values[np.isfinite(values)])
    return float(min(8, max(1, math.ceil(np.quantile(finite, 0.99))))) if finite.size else 1.0


def draw_phi(ax, panel: PhiPanel, *, norm: Normalize | None = None, chance_in_title: bool = True,
             max_ticks: int = 5):
    """Draw one φ heatmap on `ax`; returns the image for a colour bar.

    norm: the colour scale (default 0–1 for "absolute", ±2 powers of 2 for "relative");
    chance_in_title: add the panel's chance note (`chance_note`) as a second title line.
    """
    data = _relative(panel) if panel.scale == "relative" else np.asarray(panel.phi, dtype=float)
    if norm is None:
        norm = Normalize(-2.0, 2.0) if panel.scale == "relative" else Normalize(0.0, 1.0)
    shown = np.ma.masked_invalid(np.where(np.isneginf(data), float(norm.vmin or 0.0), data))
    n_i, n_j = shown.shape
    image = ax.imshow(
        shown, cmap=_cmap(RELATIVE_CMAP if panel.scale == "relative" else PHI_CMAP), norm=norm, origin="upper",
        interpolation="nearest", extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5), aspect="auto",
    )
    if panel.band is not None:
        _band_contours(ax, np.asarray(panel.phi, dtype=float), np.asarray(panel.band, dtype=float))
    ax.set_xticks(_ticks(n_j, max_ticks))
    ax.set_yticks(_ticks(n_i, max_ticks))
    ax.tick_params(labelsize=TICK_PT, length=2, pad=1.5)
    ax.set_xlabel(panel.xlabel, fontsize=LABEL_PT, labelpad=1.5)
    ax.set_ylabel(panel.ylabel, fontsize=LABEL_PT, labelpad=1.5)
    title = panel.title
    note = chance_note(panel) if chance_in_title else None
    if note:
        title += ("\n" if title else "") + note
    if title:
        ax.set_title(title, fontsize=LABEL_PT, pad=3)
    return image


def chance_note(panel: PhiPanel) -> str | None:
    """"chance ≤ 0.17" for an absolute panel whose chance level max(i, j)/d stays below 0.5;
    "chance = max(i, j)/d" when it climbs higher (a grid reaching d directions ends at 1);
    None for relative panels (white is chance) or without a chance level."""
    chance = panel.chance_grid()
    if panel.scale != "absolute" or chance is None or not np.isfinite(chance).any():
        return None
    top = float(np.nanmax(chance))
    return f"chance ≤ {top:.2g}" if top < 0.5 else "chance = max(i, j)/d"


def _band_contours(ax, phi: np.ndarray, band: np.ndarray) -> None:
    """Contours where φ leaves the random band: solid above its high edge, dashed below its low;
    a panel wholly above (below) the band is outlined just inside its edge."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    n_i, n_j = phi.shape
    if min(n_i, n_j) < 2:
        return  # a contour needs a 2-D grid
    j, i = np.arange(1, n_j + 1), np.arange(1, n_i + 1)
    outline = [patheffects.withStroke(linewidth=1.8, foreground="black")]
    for edge, style in ((band[1], "solid"), (band[0], "dashed")):
        excess = np.ma.masked_invalid(phi - edge if style == "solid" else edge - phi)
        linestyle = "solid" if style == "solid" else (0, (3, 2))
        if excess.count() and excess.max() > 0 and excess.min() < 0:
            contour = ax.contour(j, i, excess, levels=[0.0], colors="white", linewidths=0.9, linestyles=[linestyle])
            contour.set(path_effects=outline)
        elif excess.count() and excess.min() > 0:  # every cell outside the band: the contour is the panel's edge
            inset = 0.02
            ax.add_patch(Rectangle((0.5 + inset * n_j, 0.5 + inset * n_i), (1 - 2 * inset) * n_j, (1 - 2 * inset) * n_i,
                                   fill=False, edgecolor="white", linewidth=0.9, linestyle=linestyle,
                                   path_effects=outline))


MIN_PANEL_WIDTH = 1.5  # inches: a panel's ticks and title stay legible down to this


def phi_figure(panels: Sequence[PhiPanel], *, ncols: int | None = None, suptitle: str | None = None,
               width: float | None = None, panel_aspect: float = 1.0) -> Figure:
    """Heatmaps of φ in a grid, sized for `width` inches (paper Figures 3, 4, 6, 7, 8; default:
    `TEXT_WIDTH`, wider when more columns would make panels narrower than `MIN_PANEL_WIDTH`).

    One colour bar per scale ("absolute": 0–1; "relative": φ / chance on a shared symmetric log
    scale). Axis labels repeated down a column or along a row are kept once. `panel_aspect` is
    a panel's height / width. Chance notes go into the panel titles where they differ, else
    once below the panels, beside the legend of the band contours.
    """
    if not panels:
        raise ValueError("phi_figure needs at least one panel")
    n = len(panels)
    ncols = ncols or (min(n, 4) if n <= 8 else math.ceil(math.sqrt(n * 1.5)))
    nrows = math.ceil(n / ncols)
    width = width or max(TEXT_WIDTH, ncols * MIN_PANEL_WIDTH + 1.1)
    notes = {chance_note(p) for p in panels} - {None}
    shared_note = notes.pop() if len(notes) == 1 else None
    banded = any(p.band is not None for p in panels)
    footer = banded or shared_note is not None
    panel_width = (width - 1.1) / ncols  # room for the colour bar(s) and the left labels
    title_lines = max(p.title.count("\n") + 1 + (shared_note is None and chance_note(p) is not None) for p in panels)
    row_height = panel_width * panel_aspect + 0.3 + 0.13 * title_lines
    footer_lines = (2 * banded + (shared_note is not None)) if width <= 5 else 1
    height = nrows * row_height + 0.1 + (0.22 if suptitle else 0.0) + 0.14 * footer_lines * footer
    layout = ConstrainedLayoutEngine(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    fig = Figure(figsize=(width, height), layout=layout, dpi=_dpi(width, height, 300.0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    norms = {"absolute": Normalize(0.0, 1.0)}
    relative = [p for p in panels if p.scale == "relative"]
    if relative:
        limit = _relative_limit(relative)
        norms["relative"] = Normalize(-limit, limit)
    max_ticks = max(3, min(5, int(panel_width / 0.28)))
    images: dict[PhiScale, list] = {}
    for ax, panel in zip(axes, panels):
        image = draw_phi(ax, panel, norm=norms[panel.scale], chance_in_title=shared_note is None, max_ticks=max_ticks)
        images.setdefault(panel.scale, []).append((ax, image))
        ax.set_box_aspect(panel_aspect)
    for ax in axes[n:]:
        ax.set_visible(False)
    _drop_repeated_labels(list(axes[:n]), ncols)
    for scale, drawn in images.items():
        _phi_colorbar(fig, drawn, scale, norms[scale])
    if footer:
        _footer(fig, banded=banded, note=shared_note)
    if suptitle:
        fig.suptitle(suptitle, fontsize=SUPTITLE_PT)
    return fig


def _drop_repeated_labels(axes: Sequence, ncols: int) -> None:
    """x labels only on the lowest panel of a column, y labels only on the first of a row,
    where the neighbours carry the same text."""
    xlabels, ylabels = [ax.get_xlabel() for ax in axes], [ax.get_ylabel() for ax in axes]
    for index, ax in enumerate(axes):
        below = index + ncols
        if below < len(axes) and xlabels[below] == xlabels[index]:
            ax.set_xlabel("")
        if index % ncols and ylabels[index - 1] == ylabels[index]:
            ax.set_ylabel("")


def _phi_colorbar(fig: Figure, drawn: list, scale: PhiScale, norm: Normalize) -> None:
    """One colour bar for the panels `drawn` ((axes, image) pairs) of one scale."""
    axes = [ax for ax, _ in drawn]
    cbar = fig.colorbar(drawn[-1][1], ax=axes, aspect=max(8, 12 * len({ax.get_subplotspec().rowspan.start for ax in axes})),
                        pad=0.02, fraction=0.05)
    cbar.ax.tick_params(labelsize=TICK_PT, length=2, pad=1.5)
    if scale == "relative":
        limit = int(norm.vmax or 1)
        step = 1 if limit <= 3 else 2
        ticks = np.arange(-limit, limit + 1, step)
        cbar.set_ticks(ticks.tolist(), labels=[_power_of_two(int(t)) for t in ticks])
        cbar.set_label("$\\phi$ / chance", fontsize=LABEL_PT, labelpad=2)
    else:
        cbar.set_label("$\\phi(i, j)$", fontsize=LABEL_PT, labelpad=2)


def _power_of_two(exponent: int) -> str:
    return f"{2 ** exponent:g}" if exponent >= 0 else f"1/{2 ** -exponent:g}"


def _footer(fig: Figure, *, banded: bool, note: str | None) -> None:
    """Below the panels: what the band contours mean, and a chance note shared by every panel."""
    from matplotlib import patheffects
    from matplotlib.lines import Line2D

    outline = [patheffects.withStroke(linewidth=1.8, foreground="black")]
    handles, labels = [], []
    if banded:
        handles += [Line2D([], [], color="white", linewidth=0.9, linestyle=style, path_effects=outline)
                    for style in ("solid", (0, (3, 2)))]
        labels += ["$\\phi$ above the 99 % band of random subspaces", "below it"]
    if note:
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(note.replace("max(i, j)/d", "$\\max(i, j)/d$"))
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles) if fig.get_figwidth() > 5 else 1,
               fontsize=TICK_PT, frameon=False,
               handlelength=2.4, handletextpad=0.7, columnspacing=1.2, borderaxespad=0.1)


def compare_figure(report: Mapping, *, reference: np.ndarray | None = None, prefix: str = "") -> Figure:
    """φ heatmap of every module pair of a `compare` report (dict or parsed JSON), paper
    Figures 3/4.

    reference: a φ grid of two random subspaces (Figure 4, third panel), drawn last with the
        first pair's dimension d. prefix: the module paths' common prefix, dropped from the
        panel titles and shown once in the suptitle. `report.compare_figure` supplies both.
    """
    pairs = report["pairs"]
    panels = [
        PhiPanel(np.array(pair["phi"], dtype=float), title=plain_text(name[len(prefix):]), dim=pair["dim"],
                 xlabel=f"j (adapter B, r={pair['r_b']})", ylabel=f"i (adapter A, r={pair['r_a']})")
        for name, pair in pairs.items()
    ]
    if reference is not None and panels:
        (n_i, n_j), dim = np.shape(reference), panels[0].dim
        panels.append(PhiPanel(np.asarray(reference, dtype=float), title=f"random subspaces (d={dim})",
                               xlabel=f"j (random, {n_j} dims)", ylabel=f"i (random, {n_i} dims)", dim=dim))
    suptitle = f"Subspace similarity φ(i, j), basis {report['basis']}" + (f" — {plain_text(prefix)}*" if prefix else "")
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
    _savefig(fig, buffer, fmt, dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float | None = None) -> None:
    """Write the figure atomically; the format comes from the extension (.png, .pdf, .svg)."""
    fmt = figure_format(path)
    with atomic_path(path) as tmp:
        _savefig(fig, tmp, fmt, dpi)


def _savefig(fig: Figure, target, fmt: str, dpi: float | None) -> None:
    """At the figure's own size (its text sizes hold at that width), fonts embedded as TrueType.

    fontTools, which subsets the embedded fonts, logs a warning about DejaVu's timestamps on
    every PDF: it says nothing about the file, so it is kept off the user's terminal."""
    import logging

    font_log = logging.getLogger("fontTools")
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path"}):  # embedded TrueType, not Type 3
            fig.savefig(target, format=fmt, dpi=dpi or fig.dpi, metadata=_reproducible_metadata(fmt))
    finally:
        font_log.setLevel(level)


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
