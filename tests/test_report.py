"""Report dicts, summaries and renderers, checked against float64 SVDs of materialized ΔW."""

from __future__ import annotations

import json
import math
import re
import warnings
from html.parser import HTMLParser

import jsonschema
import numpy as np
import pytest
import torch

from lora_analysis import Adapter, LoraModule
from lora_analysis.analysis import analyze_adapter, compare_adapters
from lora_analysis.report import analyze_report, compare_report, load_schema, render_report
from lora_analysis.report.grouping import layer_labels
from lora_analysis.report.summary import recommendation, summarize

SIGMAS = {  # known spectra of ΔW per module
    "model.layers.0.self_attn.q_proj": [4.0, 2.0, 1.0, 0.5],
    "model.layers.0.self_attn.v_proj": [3.0, 3.0, 0.1, 0.01],
    "model.layers.1.self_attn.q_proj": [1.0, 0.5, 0.25, 0.0],
    "model.layers.1.mlp.down_proj": [6.0, 1.0, 1.0, 1.0],
}
SHAPES = {"q_proj": (24, 24), "v_proj": (8, 24), "down_proj": (24, 40)}


def module_with_spectrum(d_out: int, d_in: int, sigmas: list[float], alpha: float | None, seed: int) -> LoraModule:
    """A LoRA module whose ΔW = s·B·A has singular values `sigmas` (s = α/r, 1 if α unknown).

    A = diag(a) Vᵀ with distinct a, so A's own singular vectors are well defined (basis "A").
    """
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))
    scale = 1.0 if alpha is None else alpha / r
    a = torch.linspace(2.0, 1.0, r, dtype=torch.float64)
    A = a[:, None] * V.T
    B = U * (torch.tensor(sigmas, dtype=torch.float64) / a / scale)
    return LoraModule(A=A.float().contiguous(), B=B.float(), alpha=alpha)


def make_adapter(alpha: float | None = 8.0) -> Adapter:
    modules = {
        name: module_with_spectrum(*SHAPES[name.rsplit(".", 1)[1]], sigmas, alpha, seed)
        for seed, (name, sigmas) in enumerate(SIGMAS.items())
    }
    return Adapter(modules, source="mem.safetensors", source_format="peft")


def oracle(module: LoraModule, taus=(0.9, 0.99)) -> dict:
    """Metrics from a float64 SVD of the materialized ΔW (independent of the factored path)."""
    s = torch.linalg.svdvals(module.delta_weight(torch.float64)).numpy()[: module.r]
    energy = s**2
    tol = max(module.d_out, module.d_in) * np.finfo(np.float32).eps * s[0]
    kept = s[s > tol]

    def exp_entropy(p):
        p = p[p > 0] / p.sum()
        return float(np.exp(-(p * np.log(p)).sum()))

    cumulative = np.cumsum(energy) / energy.sum()
    return {
        "singular_values": s,
        "frobenius_norm": float(np.sqrt(energy.sum())),
        "sigma_max": float(s[0]),
        "stable_rank": float(energy.sum() / energy[0]),
        "roy_vetterli_rank": exp_entropy(kept),
        "energy_effective_rank": exp_entropy(kept**2),
        "numerical_rank": int(len(kept)),
        "energy_rank": {repr(t): int(np.searchsorted(cumulative, t - 1e-12) + 1) for t in taus},
    }


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def validate(report, schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(render_report(report, "json")), schema, cls=jsonschema.Draft202012Validator)


# ------------------------------------------------------------------------- grouping


def test_layer_labels():
    one_stack = layer_labels(["model.layers.0.q", "model.layers.12.q", "lm_head"])
    assert one_stack == {"model.layers.0.q": "0", "model.layers.12.q": "12", "lm_head": None}
    two_stacks = layer_labels(["encoder.block.0.q", "decoder.block.0.q"])
    assert two_stacks == {"encoder.block.0.q": "encoder.block.0", "decoder.block.0.q": "decoder.block.0"}


# ------------------------------------------------------------------------- analyze


def test_analyze_report_matches_float64_oracle(schema):
    adapter = make_adapter()
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    validate(report, schema)
    assert report["schema_version"] == "2.1" and report["kind"] == "analyze"
    assert list(report["modules"]) == list(SIGMAS)  # keyed by the adapter's module paths, in order
    for name, module in adapter.items():
        entry, expected = report["modules"][name], oracle(module)
        np.testing.assert_allclose(entry["singular_values"], expected["singular_values"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(entry["singular_values"], SIGMAS[name], rtol=1e-5, atol=1e-6)
        for key in ("frobenius_norm", "sigma_max", "stable_rank", "roy_vetterli_rank", "energy_effective_rank"):
            assert entry[key] == pytest.approx(expected[key], rel=1e-5), key
        assert entry["numerical_rank"] == expected["numerical_rank"]
        assert entry["energy_rank"] == expected["energy_rank"] == entry["recommended_rank"]
        assert entry["shape"] == [module.d_out, module.d_in] and entry["r"] == 4
        assert entry["alpha"] == 8.0 and entry["scale"] == 2.0
        assert entry["parameters"] == 4 * (module.d_in + module.d_out)
        assert entry["base"] is None
    q0 = report["modules"]["model.layers.0.self_attn.q_proj"]
    # σ = 4, 2, 1, 0.5: energy 16, 4, 1, 0.25 of 21.25 → 75.3%, 94.1%, 98.8%, 100%
    assert q0["energy_rank"] == {"0.9": 2, "0.99": 4}
    assert q0["parameter_saving"] == {"0.9": 2 * 48, "0.99": 0}
    assert q0["layer"] == "0" and q0["projection"] == "q"
    assert report["modules"]["model.layers.1.self_attn.q_proj"]["numerical_rank"] == 3


def test_summary_and_recommendation_totals():
    adapter = make_adapter()
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    entries = report["modules"]
    total = sum(m.r * (m.d_in + m.d_out) for m in adapter.modules.values())
    assert report["adapter"]["num_parameters"] == total
    for row, tau in zip(report["recommendation"], (0.9, 0.99)):
        kept = sum(entries[n]["energy_rank"][repr(tau)] * sum(SHAPES[n.rsplit(".", 1)[1]]) for n in entries)
        assert row["energy"] == tau and row["parameters"] == total
        assert row["recommended_parameters"] == kept and row["saving"] == total - kept
        assert row["saving_fraction"] == pytest.approx((total - kept) / total)
    by_projection = {g["group"]: g for g in report["summary"]["by_projection"]}
    assert set(by_projection) == {"q", "v", "mlp.down"} and by_projection["q"]["modules"] == 2
    q_names = [n for n in entries if n.endswith("q_proj")]
    assert by_projection["q"]["frobenius_norm"] == pytest.approx(math.hypot(*(entries[n]["frobenius_norm"] for n in q_names)))
    assert by_projection["q"]["mean_stable_rank"] == pytest.approx(np.mean([entries[n]["stable_rank"] for n in q_names]))
    assert [g["group"] for g in report["summary"]["by_layer"]] == ["0", "1"]
    assert report["summary"]["overall"]["modules"] == 4


def test_layers_summarized_in_model_order_not_string_order():
    entry = {"shape": [2, 2], "parameters": 4, "frobenius_norm": 1.0, "stable_rank": 1.0, "energy_effective_rank": 1.0,
             "numerical_rank": 1, "energy_rank": {"0.9": 1}, "recommended_rank": {"0.9": 1}, "projection": "q", "base": None}
    names = ["h.10.q", "h.2.q", "head"]
    labels = layer_labels(names)
    entries = {n: {**entry, "layer": labels[n]} for n in names}
    assert [g["group"] for g in summarize(entries, [0.9])["by_layer"]] == ["2", "10", "(none)"]
    assert recommendation(entries, [0.9])[0]["saving"] == 3 * (4 - 4)


def test_top_lists_largest_modules_but_summaries_cover_all(schema):
    adapter = make_adapter()
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter, top=2)
    validate(report, schema)
    norms = {n: float(np.linalg.norm(s)) for n, s in SIGMAS.items()}
    assert list(report["modules"]) == sorted(norms, key=norms.get, reverse=True)[:2]
    assert report["summary"]["overall"]["modules"] == 4
    assert "top 2 of 4" in render_report(report, "text")


def test_unknown_alpha_reported_as_unknown(schema):
    with pytest.warns(UserWarning, match="alpha unknown"):
        adapter = make_adapter(alpha=None)
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    validate(report, schema)
    entry = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["alpha"] is None and entry["scale"] is None and report["adapter"]["alpha_known"] is False
    np.testing.assert_allclose(entry["singular_values"], SIGMAS["model.layers.0.self_attn.q_proj"], rtol=1e-5)  # s = 1
    text = render_report(report, "text")
    assert "unknown" in text and "alpha unknown" in text.lower()


def test_text_table_is_aligned_and_markdown_well_formed():
    adapter = make_adapter()
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    text = render_report(report, "text")
    lines = text.splitlines()
    start = lines.index("Modules") + 2
    header, rule, *rows = lines[start : start + 2 + len(SIGMAS)]
    assert "‖ΔW‖_F" in header and "σ₁" in header and "r@90%" in header and "r@99%" in header
    assert set(rule) <= {"-", " "} and all(len(row) <= len(rule) for row in rows)
    assert "module paths relative to model.layers." in text
    assert rows[0].split()[0] == "0.self_attn.q_proj" and rows[0].split()[1] == "24×24"
    # numbers are right-aligned: the ‖ΔW‖_F column ends at the same position on every row
    column_end = header.index("‖ΔW‖_F") + len("‖ΔW‖_F")
    assert all(row[column_end - 1] != " " and row[column_end:column_end + 2] == "  " for row in rows)

    markdown = render_report(report, "markdown")
    tables = [block for block in markdown.split("\n\n") if block.startswith("|")]
    assert len(tables) == 4
    for table in tables:
        widths = {line.count("|") - line.count("\\|") for line in table.splitlines()}
        assert len(widths) == 1  # every row has as many cells as the header
    assert "| model.layers.0.self\\_attn.q\\_proj |" in markdown


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.links, self.headings, self._in = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "script") or "href" in attrs:
            self.links.append((tag, attrs))
        self._in = tag

    def handle_data(self, data):
        if self._in == "h2":
            self.headings.append(data)


def test_html_is_self_contained_with_tables_and_plots():
    adapter = make_adapter()
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    page = render_report(report, "html")
    parser = _PageParser()
    parser.feed(page)
    assert parser.tags.count("table") == 4 and parser.tags.count("tr") >= len(SIGMAS) + 1
    assert {"Summary by projection type", "Summary by layer", "Rank recommendation", "Modules", "Figures"} <= set(parser.headings)
    assert len(parser.images) == 2  # spectra + effective-rank heatmap (no base: no amplification)
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert parser.links == [] and "http://" not in page and "https://" not in page


def test_html_phi_grid_in_layer_order_with_short_titles_and_portable_page_title():
    from lora_analysis.report.html import display_name, phi_weight_panels

    def module(norm):
        return {"frobenius_norm": norm, "projection": "q", "base": {"phi_weight": {"phi": [[0.1]], "dim": 8}}}

    modules = {f"model.layers.{layer}.self_attn.q_proj": module(norm) for layer, norm in ((10, 5.0), (2, 9.0), (7, 1.0))}
    panels, prefix = phi_weight_panels(modules)
    assert [p.title for p in panels] == ["layer 2, q", "layer 7, q", "layer 10, q"]  # not by ‖ΔW‖_F
    assert display_name("/home/me/runs/r8/adapter_model.safetensors") == "r8/adapter_model.safetensors"
    assert display_name("adapter.safetensors") == "adapter.safetensors"


def test_render_rejects_unknown_format():
    adapter = make_adapter()
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    with pytest.raises(ValueError, match="unknown report format"):
        render_report(report, "yaml")


# ------------------------------------------------------------------------- compare


def test_compare_report_full_grid_matches_oracle(schema):
    a = make_adapter()
    b_modules = {n: module_with_spectrum(*SHAPES[n.rsplit(".", 1)[1]], [3.0, 2.0, 1.5, 1.0, 0.5, 0.2], 8.0, 100 + i)
                 for i, n in enumerate(list(SIGMAS)[:3])}
    b_modules["model.layers.5.self_attn.q_proj"] = module_with_spectrum(24, 24, [1.0], 1.0, 7)
    b = Adapter(b_modules, source="b.safetensors", source_format="ours")
    report = compare_report(compare_adapters(a, b, basis="A"), a, b)
    validate(report, schema)
    assert report["only_in_a"] == ["model.layers.1.mlp.down_proj"]
    assert report["only_in_b"] == ["model.layers.5.self_attn.q_proj"]
    name = "model.layers.0.self_attn.q_proj"
    pair = report["pairs"][name]
    # oracle: right-singular vectors of A in float64, φ(i, j) = ‖V1_iᵀ V2_j‖²_F / min(i, j)
    V1 = torch.linalg.svd(a[name].A.double(), full_matrices=False).Vh.T
    V2 = torch.linalg.svd(b[name].A.double(), full_matrices=False).Vh.T
    expected = np.array([[float((V1[:, :i].T @ V2[:, :j]).square().sum()) / min(i, j) for j in range(1, 7)]
                         for i in range(1, 5)])
    np.testing.assert_allclose(np.array(pair["phi"], dtype=float), expected, atol=1e-5)
    assert (pair["r_a"], pair["r_b"], pair["dim"], pair["basis"]) == (4, 6, 24, "A")
    assert pair["phi_1_1"] == pytest.approx(expected[0, 0], abs=1e-5)
    assert pair["top_k"] == 4 and pair["mean_top_k_diagonal"] == pytest.approx(np.mean(np.diag(expected)), abs=1e-5)
    assert pair["chance"]["phi_1_1"] == pytest.approx(1 / 24)
    assert pair["chance"]["mean_top_k_diagonal"] == pytest.approx(np.mean(np.arange(1, 5) / 24))
    cosines = torch.linalg.svdvals(V1.T @ V2).clamp(max=1).numpy()
    np.testing.assert_allclose(pair["principal_angles_deg"], np.degrees(np.arccos(cosines)), atol=1e-3)

    text = render_report(report, "text")
    assert re.search(r"^1\.mlp\.down_proj +A only$", text, re.M) and re.search(r"^5\.self_attn\.q_proj +B only$", text, re.M)
    assert "Modules in one adapter only" in render_report(report, "markdown")


def test_compare_masks_directions_beyond_numerical_rank(schema):
    a = make_adapter()
    report = compare_report(compare_adapters(a, a, basis="dW-left"), a, a)
    validate(report, schema)
    pair = report["pairs"]["model.layers.1.self_attn.q_proj"]  # σ₄ = 0: rank 3
    assert pair["phi"][3] == [None] * 4 and all(row[3] is None for row in pair["phi"])
    assert pair["phi"][2][2] == pytest.approx(1.0) and pair["phi_1_1"] == pytest.approx(1.0)
    assert pair["principal_angles_deg"] == pytest.approx([0.0] * 3, abs=0.1)  # arccos near 1: ~√eps


def test_zero_delta_has_rank_zero_and_is_dropped_by_the_recommendation(schema):
    adapter = Adapter({"h.0.q": LoraModule(torch.randn(2, 8), torch.zeros(8, 2), alpha=2.0)})  # B = 0: untrained
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    validate(report, schema)
    entry = report["modules"]["h.0.q"]
    assert entry["frobenius_norm"] == 0.0 and entry["numerical_rank"] == 0 and entry["recommended_rank"]["0.9"] == 0
    assert report["recommendation"][0]["saving_fraction"] == 1.0
    assert any("ΔW = 0 in 1 module(s)" in note for note in report["notes"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "cannot be log-scaled"
        assert "<img" in render_report(report, "html")


def test_modules_and_groups_in_model_order():
    names = ["model.layers.10.self_attn.v_proj", "model.layers.2.mlp.down_proj", "model.layers.2.self_attn.q_proj"]
    adapter = Adapter({n: module_with_spectrum(*SHAPES[n.rsplit(".", 1)[1]], [2.0, 1.0], 2.0, i) for i, n in enumerate(names)})
    report = analyze_report(analyze_adapter(adapter, progress=False), adapter)
    assert list(report["modules"]) == [names[2], names[1], names[0]]  # layer 2 before 10; q before mlp
    assert [g["group"] for g in report["summary"]["by_projection"]] == ["q", "v", "mlp.down"]
    assert [g["group"] for g in report["summary"]["by_layer"]] == ["2", "10"]
