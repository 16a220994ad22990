"""Self-contained HTML page of an `analyze` report: inline CSS, figures as base64 PNG data URIs,
no external assets (it opens offline and survives being mailed around).
"""

from __future__ import annotations

import base64
import html
from typing import Mapping, Sequence

from ..errors import escaped
from ..naming import layer_of
from .grouping import common_prefix, model_order
from .tables import Table, analyze_header, analyze_tables
from .types import AnalyzeReport, ModuleReport, base_of

MAX_PHI_PANELS = 12
NUM_CLASS = ' class="num"'

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
ul.header { list-style: none; padding: 0; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f7f9ff; }
.scroll { overflow-x: auto; }
p.note { font-size: 0.8em; color: #666; margin: 0.2em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
"""


def render_html(report: AnalyzeReport) -> str:
    """The whole page for an `analyze` report (matplotlib is imported here, lazily)."""
    title = f"LoRA analysis: {display_name(report['adapter']['path'])}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        '<ul class="header">' + "".join(f"<li>{_e(line)}</li>" for line in analyze_header(report)) + "</ul>",
        f'<p class="note">{_e(report["generator"])}, report schema {_e(report["schema_version"])}</p>',
    ]
    parts += [_table_html(table) for table in analyze_tables(report)]
    parts.append("<h2>Figures</h2>")
    parts += [_figure_html(png, caption) for png, caption in analyze_figures(report)]
    parts.append("</body></html>")
    return "\n".join(parts)


def analyze_figures(report: AnalyzeReport) -> list[tuple[bytes, str]]:
    """(PNG bytes, caption) of each figure of the page."""
    from .. import plots

    modules = report["modules"]
    if not modules:
        return []
    figures = [(plots.figure_bytes(plots.spectra_figure(spectra_by_projection(modules))),
                "Singular values of ΔW per module, normalized by σ₁, by projection type; colour = layer.")]
    rows, columns = _grid_axes(modules)  # drawn as tick labels: plain text, never mathtext
    if columns:
        cells: dict[tuple[str, str], float | None] = {
            (plots.plain_text(m["projection"]), plots.plain_text(m["layer"])): m["energy_effective_rank"]
            for m in modules.values() if m["layer"] is not None}
        figures.append((plots.figure_bytes(plots.layer_heatmap(
            cells, rows=rows, columns=columns, title="Energy effective rank exp(H(σ²/Σσ²)) of ΔW", label="effective rank")),
            "Energy effective rank per layer and projection type (grey: no LoRA module there)."))
        if report["base"] is not None:
            cells = {(plots.plain_text(m["projection"]), plots.plain_text(m["layer"])):
                     m["base"]["amplification"] if m["base"] is not None else None  # None: randomized SVD (noted)
                     for m in modules.values() if m["layer"] is not None}
            figures.append((plots.figure_bytes(plots.layer_heatmap(
                cells, rows=rows, columns=columns, title="Amplification ‖ΔW‖_F / ‖UᵀWV‖_F", label="amplification",
                cmap="magma", log=True)),
                "Amplification factor per layer and projection type (paper Table 7): how strongly ΔW amplifies "
                "directions that W does not emphasize."))
    if report["base"] is not None:
        panels, prefix = phi_weight_panels(modules)
        if panels:
            suptitle = "φ between W and ΔW (left singular vectors)" + (f" — {plots.plain_text(prefix)}*" if prefix else "")
            which = "every module" if len(modules) <= MAX_PHI_PANELS else f"the {len(panels)} modules with the largest ‖ΔW‖_F"
            figures.append((plots.figure_bytes(plots.phi_figure(panels, suptitle=suptitle, ncols=min(4, len(panels)))),
                            f"φ(i, j) between the top-i left singular vectors of W and the top-j of ΔW (paper Figure 8), "
                            f"for {which}, in model order."))
    return figures


def phi_weight_panels(modules: Mapping[str, ModuleReport]) -> tuple[list, str]:
    """φ-against-W panels of the `MAX_PHI_PANELS` modules with the largest ‖ΔW‖_F, in model order
    (layer by layer), titled "layer 3, q"; and the module paths' common prefix."""
    from .. import plots

    compared = [n for n in modules if modules[n]["base"] is not None]  # not: randomized SVD (noted)
    shown = sorted(sorted(compared, key=lambda n: modules[n]["frobenius_norm"], reverse=True)[:MAX_PHI_PANELS],
                   key=model_order)
    prefix = common_prefix(shown)
    panels = [plots.PhiPanel(base_of(modules[n])["phi_weight"]["phi"], title=_panel_title(n, modules[n], prefix),
                             xlabel="j (top-j of ΔW)", ylabel="i (top-i of W)", dim=base_of(modules[n])["phi_weight"]["dim"])
              for n in shown]
    return [p for p in panels if len(p.phi) and len(p.phi[0])], prefix


def display_name(path: str) -> str:
    """A path as a page title: its last two components (an adapter's directory and file, or its
    parent and directory), never the local absolute path."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else "adapter"


def _panel_title(name: str, module: ModuleReport, prefix: str) -> str:
    """"layer 3, query" for a numbered layer, else the name without the common prefix (plain
    text: names come from files)."""
    from ..plots import plain_text

    layer = layer_of(name)
    return plain_text(f"layer {layer[1]}, {module['projection']}" if layer is not None else name[len(prefix):])


def spectra_by_projection(modules: Mapping[str, ModuleReport]) -> dict[str, list[dict]]:
    """Module spectra grouped by projection type (plain-text titles), in the form
    `plots.spectra_figure` takes."""
    from ..plots import plain_text

    groups: dict[str, list[dict]] = {}
    for name, m in modules.items():
        layer = layer_of(name)
        groups.setdefault(plain_text(m["projection"]), []).append(
            {"label": plain_text(name), "layer": None if layer is None else layer[1], "values": m["singular_values"]})
    return groups


def _grid_axes(modules: Mapping[str, ModuleReport]) -> tuple[list[str], list[str]]:
    """Rows (projection types) and columns (layers), both in model order, as plain text."""
    from ..plots import plain_text

    layered = sorted((n for n, m in modules.items() if m["layer"] is not None), key=model_order)
    rows = list(dict.fromkeys(plain_text(modules[n]["projection"]) for n in sorted(layered, key=lambda n: model_order(n)[1])))
    columns = list(dict.fromkeys(plain_text(layer) for n in layered if (layer := modules[n]["layer"]) is not None))
    return rows, columns


def _table_html(table: Table) -> str:
    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(f"<{tag}{NUM_CLASS if num else ''}>{_e(v)}</{tag}>" for v, num in zip(values, table.numeric))

    head = f"<thead><tr>{cells('th', table.columns)}</tr></thead>"
    body = "<tbody>" + "".join(f"<tr>{cells('td', row)}</tr>" for row in table.rows) + "</tbody>"
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in table.notes)
    return f'<h2>{_e(table.title)}</h2><div class="scroll"><table>{head}{body}</table></div>{notes}'


def _figure_html(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _e(text: str) -> str:
    return html.escape(escaped(text), quote=True)
