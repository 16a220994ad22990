"""`analyze`, `compare` and the HTML report on adapters that are not s·B·A — LoHa, LoKr, DoRA,
Tucker — written by the tools' own code (tests/fixtures/formats), through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors import safe_open

from lora_analysis.cli import main
from lora_analysis.report import load_schema

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args] + ["--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_of(capsys, *args) -> dict:
    code, out, err = run(capsys, *args, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)
    return report


def reference(folder: str, key: str) -> torch.Tensor:
    with safe_open(FIXTURES / folder / "reference.safetensors", "pt") as f:
        delta = f.get_tensor(key).double()
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))


@pytest.mark.parametrize("folder, path, kind", [
    ("peft_loha", "peft_loha", "loha"),
    ("lycoris_lokr", "lycoris_lokr/lycoris.safetensors", "lokr"),
    ("lycoris_locon_tucker", "lycoris_locon_tucker/lycoris.safetensors", "tucker"),
])
def test_analyze_reports_each_kind_with_the_tools_spectrum(capsys, folder, path, kind):
    report = report_of(capsys, "analyze", FIXTURES / path)
    expected = json.loads((FIXTURES / folder / "expected.json").read_text())
    kinds = {m["kind"] for m in report["modules"].values()}
    assert kind in kinds and report["adapter"]["kinds"].get(kind)
    for module in expected["modules"]:
        entry = next(e for n, e in report["modules"].items() if n.rpartition("/")[2] == module["name"])
        assert entry["kind"] == module["kind"] and entry["r"] == module["r"]
        S_ref = reference(folder, module["reference_key"])
        k = len(entry["singular_values"])
        torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), S_ref[:k],
                                   rtol=1e-5, atol=1e-5 * float(S_ref[0]))
        assert (S_ref[k:] <= 1e-5 * S_ref[0]).all()


def test_dora_needs_base_or_the_direction_flag(capsys):
    code, out, err = run(capsys, "analyze", FIXTURES / "peft_dora")
    assert code == 2 and out == "" and "--base" in err and "--dora-direction" in err and err.count("\n") == 1
    direction = report_of(capsys, "analyze", FIXTURES / "peft_dora", "--dora-direction")
    assert {m["kind"] for m in direction["modules"].values()} == {"dora-direction"}
    assert any("direction update" in note for note in direction["notes"])
    text = run(capsys, "analyze", FIXTURES / "peft_dora", "--dora-direction")[1]
    assert "dora-direction" in text and "direction update" in text


def test_dora_with_base_is_the_tools_delta(capsys):
    folder = FIXTURES / "peft_dora"
    report = report_of(capsys, "analyze", folder, "--base", folder / "base.safetensors", "--no-intruders")
    expected = json.loads((folder / "expected.json").read_text())
    for module in expected["modules"]:
        entry = report["modules"][module["name"]]
        assert entry["kind"] == "dora" and entry["base"] is not None
        S_ref = reference("peft_dora", module["reference_key"])
        torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), S_ref,
                                   rtol=1e-5, atol=1e-5 * float(S_ref[0]))


def test_html_report_on_lokr_and_dora(capsys, tmp_path):
    out = tmp_path / "lokr.html"
    code, _, err = run(capsys, "analyze", FIXTURES / "lycoris_lokr" / "lycoris.safetensors", "--format", "html", "-o", out)
    assert code == 0, err
    page = out.read_text()
    assert "<table" in page and "lokr" in page and "text_encoder" in page and "data:image/png;base64," in page
    folder = FIXTURES / "peft_dora"
    out = tmp_path / "dora.html"
    code, _, err = run(capsys, "analyze", folder, "--base", folder / "base.safetensors", "--intruder-k", "4",
                       "--format", "html", "-o", out)
    assert code == 0, err
    assert "dora" in out.read_text()


def test_compare_kinds_without_factor_a_in_a_labelled_basis(capsys, tmp_path):
    copy = tmp_path / "loha_copy"
    shutil.copytree(FIXTURES / "peft_loha", copy)
    report = report_of(capsys, "compare", FIXTURES / "peft_loha", copy)
    assert report["basis"] == "A" and report["pairs"]
    for pair in report["pairs"].values():
        assert pair["basis"] == "dW-right" and pair["phi_1_1"] == pytest.approx(1.0)
    assert any("dW-right" in note for note in report["notes"])
    text = run(capsys, "compare", FIXTURES / "peft_loha", copy)[1]
    assert "dW-right" in text
    code, out, err = run(capsys, "compare", FIXTURES / "peft_loha", copy, "--basis", "A")
    assert code == 2 and out == "" and "dW-right" in err and err.count("\n") == 1


def test_compare_lokr_with_lora_modules_of_one_model(capsys):
    lokr = FIXTURES / "lycoris_lokr" / "lycoris.safetensors"
    locon = FIXTURES / "lycoris_locon" / "lycoris.safetensors"
    report = report_of(capsys, "compare", lokr, locon, "--basis", "dW-left")
    assert len(report["pairs"]) == 12 and all(p["basis"] == "dW-left" for p in report["pairs"].values())
    assert report["adapters"]["a"]["kinds"] == {"lokr": 12} and report["adapters"]["b"]["kinds"] == {"lora": 12}


def test_base_weights_settle_what_loralib_files_leave_open(capsys):
    """With --base, loralib's Conv2d is read as one (ΔW = (B·A).view(…), kind dense), its
    weight found at `<module>.conv.weight`, and ΔW is compared with it; embeddings and
    fan_in_fan_out linears are oriented by their shapes."""
    folder = FIXTURES / "loralib_linear_conv_embedding"
    report = report_of(capsys, "analyze", folder / "lora.pt", "--base", folder / "base.safetensors", "--alpha", "4",
                       "--no-intruders")
    modules = report["modules"]
    assert modules["conv"]["kind"] == "dense" and modules["conv"]["storage"] == "conv 3×3"
    assert modules["conv"]["base"]["base_module"] == "conv.conv"
    assert not any("do not record layer types" in note for note in report["notes"])
    expected = json.loads((folder / "expected.json").read_text())
    for module in expected["modules"]:
        entry = modules[module["name"]]
        S_ref = reference(folder.name, module["reference_key"]) * (4.0 / module["tool_alpha"])  # --alpha 4
        k = len(entry["singular_values"])
        torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), S_ref[:k],
                                   rtol=1e-5, atol=1e-5 * float(S_ref[0]))
        assert entry["base"]["weight_frobenius_norm"] > 0


def test_compare_figure_title_names_the_fallback_basis(capsys, tmp_path):
    from lora_analysis.report.figures import compare_figure

    copy = tmp_path / "lokr_copy"
    shutil.copytree(FIXTURES / "peft_lokr", copy)
    plot = tmp_path / "phi.png"
    code, out, err = run(capsys, "compare", FIXTURES / "peft_lokr", copy, "--format", "json", "--plot", plot)
    assert code == 0 and plot.stat().st_size > 0, err
    title = compare_figure(json.loads(out), reference=False).get_suptitle()
    assert "basis A (dW-right for kinds without factor A)" in title
