"""The typed report: its records mirror schema.json, the JSON holds the right number in the
right field (float64 oracles), and every Table 7 / φ / intruder value shown in the text,
markdown and HTML outputs is the JSON's value for the same module."""

from __future__ import annotations

import json
import math
import typing

import numpy as np
import pytest
import torch
from report_tables import column, html_tables, markdown_tables, shown, text_tables
from safetensors.torch import save_file

from lora_analysis import Adapter, BaseWeights, LoraModule
from lora_analysis.analysis import AnalysisOptions, analyze_adapter, compare_adapters
from lora_analysis.report import analyze_report, compare_report, load_schema, render_report
from lora_analysis.report import types as report_types
from lora_analysis.seeding import random_basis, seeded_generator

SHAPES = {  # module -> (d_out, d_in, r)
    "model.layers.0.self_attn.q_proj": (24, 24, 4),
    "model.layers.0.self_attn.v_proj": (16, 24, 3),
    "model.layers.1.self_attn.q_proj": (24, 24, 4),
    "model.layers.1.mlp.down_proj": (24, 40, 2),
}


def random_adapter(seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g) * 0.3, alpha=2.0 * r)
        for name, (d_out, d_in, r) in SHAPES.items()
    }
    return Adapter(modules, source=f"seed{seed}.safetensors", source_format="peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(adapter, base weights {name: W float64}, JSON analyze report with base)."""
    g = torch.Generator().manual_seed(100)
    weights = {}
    for name, (d_out, d_in, _) in SHAPES.items():
        U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
        k = min(d_out, d_in)
        weights[name] = (U[:, :k] * torch.logspace(1, -1, k, dtype=torch.float64)) @ V[:, :k].T
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_file({f"{n}.weight": W.float().contiguous() for n, W in weights.items()}, str(path))
    weights = {n: W.float().double() for n, W in weights.items()}  # what the file holds
    adapter = random_adapter(0)
    analysis = analyze_adapter(adapter, BaseWeights(path), AnalysisOptions(device="cpu", cache=False), progress=False)
    report = analyze_report(analysis, adapter)
    return adapter, weights, report


# ---------------------------------------------------------------------------- the records


def _schema_object(schema: dict, pointer: str) -> tuple[set[str], set[str]]:
    """(properties, required) of the schema object at `pointer`, through allOf/$ref."""
    node = schema
    for part in pointer.removeprefix("#/").split("/"):
        node = node[int(part)] if part.isdigit() else node[part]
    properties, required = set(node.get("properties", {})), set(node.get("required", []))
    for ref in node.get("allOf", []):
        p, r = _schema_object(schema, ref["$ref"])
        properties, required = properties | p, required | r
    return properties, required


RECORDS = {
    "AdapterInfo": "#/$defs/adapter_info",
    "AnalyzedAdapterInfo": "#/$defs/analyze_report/properties/adapter",
    "BaseInfo": "#/$defs/analyze_report/properties/base/oneOf/1",
    "AnalyzeSettings": "#/$defs/analyze_report/properties/settings",
    "Chance": "#/$defs/phi_grid/properties/chance",
    "PhiGrid": "#/$defs/phi_grid",
    "ProjectionNormsReport": "#/$defs/base_report/properties/projection_norms",
    "IntrudersReport": "#/$defs/base_report/properties/intruders",
    "BaseReport": "#/$defs/base_report",
    "ModuleReport": "#/$defs/module_report",
    "SvdReport": "#/$defs/svd_report",
    "SvdIntervals": "#/$defs/svd_report/properties/intervals",
    "GroupSummary": "#/$defs/group_summary",
    "Summary": "#/$defs/analyze_report/properties/summary",
    "Recommendation": "#/$defs/analyze_report/properties/recommendation/items",
    "AnalyzeReport": "#/$defs/analyze_report",
    "ModulePair": "#/$defs/module_pair",
    "CompareAdapters": "#/$defs/compare_report/properties/adapters",
    "CompareSettings": "#/$defs/compare_report/properties/settings",
    "CompareReport": "#/$defs/compare_report",
}


@pytest.mark.parametrize("record, pointer", RECORDS.items())
def test_records_mirror_the_schema(record, pointer):
    """Each TypedDict has exactly its schema object's properties, and requires at least what
    the schema requires (the builder always writes the rest)."""
    schema = load_schema()
    properties, required = _schema_object(schema, pointer)
    if record in ("AnalyzeReport", "CompareReport"):  # the top-level keys every report has
        properties |= set(schema["properties"])
        required |= set(schema["required"])
    typed = getattr(report_types, record)
    assert set(typing.get_type_hints(typed)) == properties
    assert required <= typed.__required_keys__


def test_every_schema_object_has_a_record():
    """Every object of named fields in `$defs` (maps such as int_by_threshold are plain dicts)."""
    defs = {pointer.split("/")[2] for pointer in RECORDS.values()}
    records = {name for name, d in load_schema()["$defs"].items() if "properties" in d}
    assert records <= defs, records - defs


# ---------------------------------------------------------------------------- JSON vs oracle


def test_json_table7_phi_and_intruders_match_float64_oracles(setup):
    """Each JSON field holds its own quantity: computed here from materialized ΔW and W in
    float64 (a swap of two fields in the builder, e.g. `weight` and `random`, fails here)."""
    adapter, weights, report = setup
    data = json.loads(render_report(report, "json"))
    for name, entry in data["modules"].items():
        W, module = weights[name], adapter[name]
        delta = module.delta_weight(torch.float64)
        U, S, Vh = torch.linalg.svd(delta)
        r = entry["numerical_rank"]
        assert r == module.r
        U_W, S_W, Vh_W = torch.linalg.svd(W)
        base = entry["base"]
        projection = base["projection_norms"]
        assert base["weight_frobenius_norm"] == pytest.approx(float(W.norm()), rel=1e-6)
        assert projection["delta"] == pytest.approx(float((U[:, :r].T @ W @ Vh[:r].T).norm()), rel=1e-4)
        assert projection["weight"] == pytest.approx(float(S_W[:r].square().sum().sqrt()), rel=1e-5)  # closed form
        generator = seeded_generator(0)
        random_U, random_V = random_basis(W.shape[0], r, generator), random_basis(W.shape[1], r, generator)
        assert projection["random"] == pytest.approx(float((random_U.T @ W @ random_V).norm()), rel=1e-5)
        assert base["amplification"] == pytest.approx(float(S.square().sum().sqrt()) / projection["delta"], rel=1e-4)
        assert entry["frobenius_norm"] == pytest.approx(float(S.square().sum().sqrt()), rel=1e-5)
        # Figure 8: φ(i, j) between W's top-i and ΔW's top-j left singular vectors
        phi = np.array(base["phi_weight"]["phi"], dtype=float)
        k = min(W.shape)
        assert phi.shape == (k, r) and base["phi_weight"]["dim"] == W.shape[0]
        for i in range(1, k + 1):
            for j in range(1, r + 1):
                expected = float((U_W[:, :i].T @ U[:, :j]).square().sum()) / min(i, j)
                assert phi[i - 1, j - 1] == pytest.approx(expected, abs=1e-5)
        # intruders: top-10 left singular vectors of W + ΔW against all of W's
        tuned = torch.linalg.svd(W + delta)[0][:, :10]
        max_cos = (U_W.T @ tuned).abs().amax(dim=0).numpy()
        intruders = base["intruders"]
        np.testing.assert_allclose(intruders["max_cosines"], max_cos, atol=1e-4)
        assert intruders["indices"] == [int(i) for i in np.flatnonzero(max_cos < 0.5)]
        assert intruders["count"] == len(intruders["indices"])


# ---------------------------------------------------------------------------- shown = JSON


def _phi_corner(phi: list[list[float | None]]) -> tuple[int, float]:
    k = max(i for i in range(1, min(len(phi), len(phi[0])) + 1) if phi[i - 1][i - 1] is not None)
    return k, phi[k - 1][k - 1]


@pytest.mark.parametrize("fmt, read", [("text", text_tables), ("markdown", markdown_tables), ("html", html_tables)])
def test_every_shown_table7_phi_and_intruder_value_is_the_jsons(setup, fmt, read):
    _, _, report = setup
    data = json.loads(render_report(report, "json"))
    tables = read(render_report(report, fmt))
    base_table, modules_table = tables["Against the base weights"], tables["Modules"]
    assert sorted(row[0] for row in base_table[1]) == sorted(data["modules"])
    expected_columns = {  # column -> (value from the JSON module entry, significant digits)
        "‖W‖_F": (lambda m: m["base"]["weight_frobenius_norm"], 4),
        "‖ΔW‖_F": (lambda m: m["frobenius_norm"], 4),
        "‖UᵀWV‖ ΔW": (lambda m: m["base"]["projection_norms"]["delta"], 4),
        "‖UᵀWV‖ W": (lambda m: m["base"]["projection_norms"]["weight"], 4),
        "‖UᵀWV‖ random": (lambda m: m["base"]["projection_norms"]["random"], 4),
        "amplification": (lambda m: m["base"]["amplification"], 3),
        "φ_W(k, k)": (lambda m: _phi_corner(m["base"]["phi_weight"]["phi"])[1], 3),
        "chance": (lambda m: _phi_corner(m["base"]["phi_weight"]["phi"])[0] / m["base"]["phi_weight"]["dim"], 2),
    }
    for name, (value, digits) in expected_columns.items():
        cells = column(base_table, name)
        for module, entry in data["modules"].items():
            assert float(cells[module]) == shown(value(entry), digits), (fmt, name, module)
    intruders = column(base_table, "intruders")
    for module, entry in data["modules"].items():
        found = entry["base"]["intruders"]
        assert intruders[module] == f"{found['count']}/{found['top_k']}"
    for name, key, digits in (("σ₁", "sigma_max", 4), ("stable rank", "stable_rank", 3),
                              ("energy eff. rank", "energy_effective_rank", 3), ("num. rank", "numerical_rank", 4)):
        cells = column(modules_table, name)
        for module, entry in data["modules"].items():
            assert float(cells[module]) == shown(entry[key], digits), (fmt, name, module)


@pytest.mark.parametrize("fmt, read", [("text", text_tables), ("markdown", markdown_tables)])
def test_every_shown_compare_value_is_the_jsons(fmt, read):
    a, b = random_adapter(1), random_adapter(2)
    report = compare_report(compare_adapters(a, b, basis="A", top_k=2), a, b, top_k=2)
    data = json.loads(render_report(report, "json"))
    table = read(render_report(report, fmt))["Subspace similarity φ per module"]
    assert sorted(row[0] for row in table[1]) == sorted(data["pairs"])
    for name, value, digits, occurrence in (
        ("φ(1,1)", lambda p: p["phi_1_1"], 3, 0),
        ("chance", lambda p: p["chance"]["phi_1_1"], 2, 0),
        ("mean φ(i,i) i≤k", lambda p: p["mean_top_k_diagonal"], 3, 0),
        ("chance", lambda p: p["chance"]["mean_top_k_diagonal"], 2, 1),
        ("smallest angle°", lambda p: p["principal_angles_deg"][0], 3, 0),
        ("largest angle°", lambda p: p["principal_angles_deg"][-1], 3, 0),
        ("k", lambda p: p["top_k"], 4, 0),
    ):
        cells = column(table, name, occurrence)
        for module, pair in data["pairs"].items():
            assert float(cells[module]) == shown(value(pair), digits), (fmt, name, module)
            assert pair["phi_1_1"] == pytest.approx(pair["phi"][0][0]) and not math.isnan(pair["phi_1_1"])
