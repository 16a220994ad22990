"""Figures: φ heatmaps on a fixed 0–1 scale with chance level, spectra, per-layer heatmaps, files."""

from __future__ import annotations

import numpy as np
import pytest

from lora_analysis import plots
from lora_analysis.analysis import random_reference_grid
from lora_analysis.errors import LoraAnalysisError


def _images(fig):
    return [image for ax in fig.axes for image in ax.get_images()]


def test_phi_figure_fixed_scale_labels_chance_and_mask():
    phi = np.linspace(0.2, 0.6, 4 * 6).reshape(4, 6)
    phi[3, :] = np.nan  # beyond the numerical rank
    panels = [plots.PhiPanel(phi, title="layer 0 query", xlabel="j (r=6)", ylabel="i (r=4)", dim=64),
              plots.PhiPanel(phi[:2, :3], title="layer 1 query", dim=16)]
    fig = plots.phi_figure(panels, suptitle="φ")

    images = _images(fig)
    assert len(images) == 2
    for image in images:  # colour range 0–1 regardless of the data's range
        assert image.norm.vmin == 0.0 and image.norm.vmax == 1.0
    data = images[0].get_array()
    assert data.shape == (4, 6) and data.mask[3].all() and not data.mask[:3].any()
    np.testing.assert_allclose(data[:3].filled(), phi[:3])
    first, second = fig.axes[:2]
    assert first.get_xlabel() == "j (r=6)" and first.get_ylabel() == "i (r=4)"
    # chance per panel, in its title (the panels' levels differ): max(i, j)/d = 6/64 and 3/16
    assert first.get_title() == "layer 0 query\nchance ≤ 0.094" and second.get_title() == "layer 1 query\nchance ≤ 0.19"
    assert [int(t) for t in first.get_yticks()] == [1, 2, 3, 4]  # 1-based, one per direction
    assert not [t for ax in fig.axes for t in ax.texts]  # no note drawn on the data
    colorbar = [ax for ax in fig.axes if ax.get_ylabel() == "$\\phi(i, j)$"]
    assert len(colorbar) == 1 and not colorbar[0].lines  # no single "chance" tick on the shared bar


def test_shared_chance_note_relative_scale_and_band_contours():
    d = 32
    chance = np.maximum(np.arange(1, 9)[:, None], np.arange(1, 9)[None, :]) / d
    phi = chance.copy()
    phi[0, 0] = 0.9  # a shared top direction, far above chance
    band = np.stack([chance * 0.5, chance * 2.0])
    panels = [plots.PhiPanel(phi, title="a", dim=d, band=band), plots.PhiPanel(phi, title="b", dim=d, band=band),
              plots.PhiPanel(phi, title="a", dim=d, band=band, scale="relative")]
    fig = plots.phi_figure(panels, ncols=2, width=plots.COLUMN_WIDTH)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "a"]  # one level: said once, below
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[-1] == "chance ≤ 0.25" and "band" in labels[0]
    # φ leaves the band only at (1, 1): one solid contour per panel, none below
    contours = [c for c in fig.axes[0].collections if c.__class__.__name__ == "QuadContourSet"]
    assert len(contours) == 1
    relative = fig.axes[2].get_images()[0]
    assert relative.norm.vmin == -relative.norm.vmax  # symmetric log₂ scale around chance (white)
    np.testing.assert_allclose(relative.get_array()[3, 3], 0.0, atol=1e-12)
    bars = sorted(ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().startswith("$\\phi"))
    assert bars == ["$\\phi$ / chance", "$\\phi(i, j)$"]  # one colour bar per scale


def test_a_panel_wholly_above_the_band_is_outlined():
    """No contour exists when every cell is above the band: the panel's edge says so instead."""
    phi = np.full((4, 6), 0.9)
    band = np.stack([np.zeros((4, 6)), np.full((4, 6), 0.5)])
    fig = plots.phi_figure([plots.PhiPanel(phi, dim=64, band=band), plots.PhiPanel(phi, dim=64)], ncols=2)
    outlined, plain = fig.axes[:2]
    edges = [p for p in outlined.patches if p.__class__.__name__ == "Rectangle" and p.get_edgecolor()[:3] == (1, 1, 1)]
    assert len(edges) == 1 and edges[0].get_linestyle() == "solid"
    assert not [p for p in plain.patches if p.get_edgecolor()[:3] == (1, 1, 1)]
    assert not [c for c in outlined.collections if c.__class__.__name__ == "QuadContourSet"]


@pytest.mark.parametrize("width, ncols, n, shape", [
    (plots.COLUMN_WIDTH, 2, 4, (8, 64)),   # Figure 3
    (plots.COLUMN_WIDTH, 3, 6, (64, 64)),  # Figure 4, two rows
    (plots.TEXT_WIDTH, 6, 12, (64, 64)),   # Figures 6 and 7
    (plots.TEXT_WIDTH, 4, 8, (384, 64)),   # Figure 8
])
def test_section7_layouts_are_legible_at_their_width(width, ncols, n, shape, tmp_path):
    """Rendered at the width it is set for, no text is below 7 pt, and it is that wide; PDFs
    embed TrueType fonts (no Type 3)."""
    rng = np.random.default_rng(0)
    dim = max(shape)
    panels = [plots.PhiPanel(rng.random(shape), title="layer 5, $\\Delta W_q$", xlabel="$j$ (seed 1)",
                             ylabel="$i$ (seed 0)", dim=dim, band=np.stack([np.zeros(shape), np.full(shape, 0.9)]),
                             scale="relative" if k >= n // 2 else "absolute") for k in range(n)]
    fig = plots.phi_figure(panels, ncols=ncols, width=width, suptitle="$\\phi(A, A', i, j)$, layer 3")
    plots.save_figure(fig, tmp_path / "f.png")
    from matplotlib.image import imread

    pixels_wide = imread(tmp_path / "f.png").shape[1]
    assert pixels_wide == pytest.approx(width * fig.dpi, abs=2)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
             if t.get_text().strip() and t.get_visible() and t.get_window_extent(renderer).width > 0]
    assert texts and min(t.get_fontsize() for t in texts) >= 7.0
    inside = fig.bbox.expanded(1.001, 1.001)
    assert all(inside.contains(*t.get_window_extent(renderer).p0) and inside.contains(*t.get_window_extent(renderer).p1)
               for t in texts)  # nothing cut off at the edges
    pdf = plots.figure_bytes(fig, "pdf")
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf


def test_phi_figure_needs_panels():
    with pytest.raises(ValueError):
        plots.phi_figure([])


def test_spectra_figure_normalized_lines_per_module():
    spectra = {
        "q": [{"label": "layer 0", "layer": 0, "values": [4.0, 2.0, 1.0]},
              {"label": "layer 1", "layer": 1, "values": [8.0, 8.0, 0.5]}],
        "v": [{"label": "layer 0", "layer": 0, "values": [3.0, 0.3]}],
    }
    fig = plots.spectra_figure(spectra)
    q, v = fig.axes[:2]
    assert q.get_title() == "q" and v.get_title() == "v" and q.get_yscale() == "log"
    assert len(q.lines) == 2 and len(v.lines) == 1
    np.testing.assert_allclose(q.lines[0].get_ydata(), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(q.lines[1].get_xdata(), [1, 2, 3])
    assert q.lines[0].get_color() != q.lines[1].get_color()  # coloured by layer
    assert any(ax.get_ylabel() == "layer" for ax in fig.axes)  # colour bar for layers


def test_layer_heatmap_places_values_and_masks_missing_cells():
    values = {("q", "0"): 1.5, ("q", "1"): 2.5, ("v", "1"): 7.0}
    fig = plots.layer_heatmap(values, rows=["q", "v"], columns=["0", "1"], title="effective rank", label="rank")
    ax = fig.axes[0]
    grid = ax.get_images()[0].get_array()
    assert grid.mask.tolist() == [[False, False], [True, False]]
    np.testing.assert_allclose(grid[0].filled(), [1.5, 2.5])
    assert grid[1, 1] == 7.0
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q", "v"]
    assert ax.get_xlabel() == "layer" and ax.get_title() == "effective rank"
    assert sorted(t.get_text() for t in ax.texts) == ["1.5", "2.5", "7"]
    assert fig.axes[1].get_ylabel() == "rank"


def test_layer_heatmap_log_scale():
    from matplotlib.colors import LogNorm

    fig = plots.layer_heatmap({("q", "0"): 2.0, ("q", "1"): 200.0}, rows=["q"], columns=["0", "1"],
                              title="amplification", label="x", log=True)
    assert isinstance(fig.axes[0].get_images()[0].norm, LogNorm)


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_save_figure_format_from_extension_atomic(tmp_path, suffix, magic):
    fig = plots.phi_figure([plots.PhiPanel(np.eye(3), dim=16)])
    path = tmp_path / "sub" / f"phi{suffix}"
    plots.save_figure(fig, path)
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_save_figure_rejects_unknown_extension(tmp_path):
    fig = plots.phi_figure([plots.PhiPanel(np.eye(2), dim=4)])
    with pytest.raises(LoraAnalysisError, match=r"phi\.jpg: unsupported figure format 'jpg'"):
        plots.save_figure(fig, tmp_path / "phi.jpg")
    assert not any(tmp_path.iterdir())


def test_png_bytes_are_reproducible():
    def render():
        return plots.figure_bytes(plots.phi_figure([plots.PhiPanel(np.full((2, 2), 0.5), dim=8)]))

    assert render() == render()


def test_compare_figure_replots_a_json_report():
    phi = [[1.0, 1.0, 1.0], [0.5, 0.75, None]]
    pair = {"phi": phi, "dim": 16, "r_a": 2, "r_b": 3}
    report = {"basis": "dW-left", "pairs": {"model.layers.0.q_proj": pair, "model.layers.1.q_proj": pair}}
    reference = random_reference_grid(16, 2, 3)
    fig = plots.compare_figure(report, reference=reference, prefix="model.layers.")
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["0.q_proj", "1.q_proj", "random subspaces (d=16)"]
    assert fig.get_suptitle() == "Subspace similarity φ(i, j), basis dW-left — model.layers.*"
    assert panels[0].get_ylabel() == "i (adapter A, r=2)" and panels[0].get_xlabel() == "j (adapter B, r=3)"
    grid = panels[0].get_images()[0].get_array()
    assert grid.mask.tolist() == [[False] * 3, [False, False, True]] and grid[1, 1] == 0.75
    random = panels[2].get_images()[0].get_array()
    assert random.shape == (2, 3) and 0.0 <= random.min() and random.max() < 0.9
    np.testing.assert_array_equal(random, reference)  # the grid the caller passed, drawn as is
    assert panels[2].get_xlabel() == "j (random, 3 dims)" and panels[2].get_ylabel() == "i (random, 2 dims)"
    assert len(plots.compare_figure(report).axes) == 3  # 2 panels + colour bar
    assert plots.compare_figure(report).get_suptitle() == "Subspace similarity φ(i, j), basis dW-left"


def test_report_compare_figure_supplies_prefix_and_random_reference():
    """`report.figures.compare_figure` is `plots.compare_figure` with the report's common prefix
    and a random reference grid of the first pair's sizes (seeded: the same every time)."""
    from lora_analysis.report.figures import compare_figure

    pair = {"phi": [[1.0, 0.5, 0.25], [0.5, 0.75, 0.5]], "dim": 16, "r_a": 2, "r_b": 3, "basis": "A"}
    report = {"basis": "A", "pairs": {"model.layers.0.q_proj": pair, "model.layers.1.q_proj": pair}}
    fig = compare_figure(report)
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["0.q_proj", "1.q_proj", "random subspaces (d=16)"]
    np.testing.assert_allclose(panels[2].get_images()[0].get_array(), random_reference_grid(16, 2, 3))
    assert len(compare_figure(report, reference=False).axes) == 3


def test_phi_figure_titles_ticks_and_chance_text_for_full_grids():
    """A 64 × 64 grid gets a few round 1-based ticks (every index would collide); a grid that
    spans most of R^d says "chance = max(i, j)/d" instead of an upper bound, and the colour bar
    carries no chance mark (one mark cannot hold every panel's level)."""
    big = plots.PhiPanel(np.full((64, 64), 0.3), dim=512)
    full = plots.PhiPanel(np.full((6, 6), 0.3), dim=8)
    fig = plots.phi_figure([big, full], suptitle="two grids")
    assert fig.get_suptitle() == "two grids"
    ticks = [int(t) for t in fig.axes[0].get_xticks()]
    assert ticks[0] == 1 and ticks[-1] <= 64 and 3 <= len(ticks) <= 6 and ticks == sorted(ticks)
    assert list(fig.axes[0].get_images()[0].get_extent()) == [0.5, 64.5, 64.5, 0.5]  # cell (i, j) centred on (j, i)
    # chance per panel, in the titles (the levels differ), never on the data or the colour bar
    assert [fig.axes[0].get_title(), fig.axes[1].get_title()] == ["chance ≤ 0.12", "chance = max(i, j)/d"]
    assert not fig.axes[1].texts
    colorbar = [ax for ax in fig.axes if ax.get_ylabel() == "$\\phi(i, j)$"][0]
    assert not colorbar.lines


def test_spectra_figure_skips_zero_updates_and_keeps_raw_values_unnormalized():
    spectra = {"q": [{"label": "zero", "layer": 0, "values": [0.0, 0.0]},
                     {"label": "rank 2", "layer": 1, "values": [3.0, 1.5, 0.0]}]}
    fig = plots.spectra_figure(spectra, normalize=False)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["rank 2"]  # ΔW = 0 has nothing to draw
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [3.0, 1.5])  # zeros cannot sit on a log axis
    assert ax.get_ylabel() == "σ_k"
    linear = plots.spectra_figure(spectra, normalize=True, logy=False).axes[0]
    np.testing.assert_allclose(linear.lines[0].get_ydata(), [1.0, 0.5, 0.0])
    assert linear.get_yscale() == "linear"
    with pytest.raises(ValueError):
        plots.spectra_figure({"q": []})


def test_layer_heatmap_annotation_contrast_and_log_limits():
    from matplotlib.colors import LogNorm

    fig = plots.layer_heatmap({("q", "0"): 2.0, ("q", "1"): 200.0}, rows=["q"], columns=["0", "1"],
                              title="amplification", label="x", log=True)
    ax = fig.axes[0]
    norm = ax.get_images()[0].norm
    assert isinstance(norm, LogNorm) and (norm.vmin, norm.vmax) == (2.0, 200.0)
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours == {"2": "white", "200": "black"}  # light text on the dark end, dark on the light end
    assert fig.axes[1].get_ylabel() == "x (log scale)"
    flat = plots.layer_heatmap({("q", "0"): 2.0, ("q", "1"): 3.0}, rows=["q"], columns=["0", "1"],
                               title="t", label="x", log=True)  # less than a factor 10: linear
    assert not isinstance(flat.axes[0].get_images()[0].norm, LogNorm)


def test_many_panels_stay_under_the_pixel_cap():
    panels = [plots.PhiPanel(np.eye(4), dim=16) for _ in range(60)]
    fig = plots.phi_figure(panels)
    width, height = fig.get_size_inches()
    assert max(width, height) * fig.dpi <= plots.MAX_PIXELS + 1e-6
    assert sum(ax.get_visible() and bool(ax.get_images()) for ax in fig.axes) == 60
