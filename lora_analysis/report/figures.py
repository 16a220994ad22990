"""Figures of reports: what `plots` draws, given the references and labels a report implies."""

from __future__ import annotations

from matplotlib.figure import Figure

from .. import plots
from ..analysis import random_reference_grid
from .grouping import common_prefix
from .types import CompareReport


def compare_figure(report: CompareReport, *, reference: bool = True) -> Figure:
    """φ heatmaps of a `compare` report's module pairs (paper Figures 3/4), titles without the
    paths' common prefix; `reference` adds a panel of two independent random subspaces of the
    first pair's sizes (Figure 4, third panel)."""
    pairs = report["pairs"]
    grid = None
    if reference and pairs:
        first = next(iter(pairs.values()))
        n_i, n_j = len(first["phi"]), len(first["phi"][0]) if first["phi"] else 0
        grid = random_reference_grid(first["dim"], n_i, n_j)
    other = sorted({p["basis"] for p in pairs.values()} - {report["basis"]})
    labelled = dict(report)  # the title names every basis the panels use
    if other:
        labelled["basis"] = f"{report['basis']} ({', '.join(other)} for kinds without factor {report['basis']})"
    return plots.compare_figure(labelled, reference=grid, prefix=common_prefix(list(pairs)))
