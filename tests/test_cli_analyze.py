"""`lora-analysis analyze` / `compare` end to end: adapters from our core, PEFT (BERT; GPT-2
Conv1D) and a hand-written kohya file; formats, schema, bad inputs, exit codes, lean start-up."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_analysis import LoraConfig, extract_adapter, inject_lora, load_adapter, save_adapter
from lora_analysis.cli import main
from lora_analysis.report import load_schema
from lora_test_utils import randomize_lora
from report_tables import column, html_tables, shown

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft

ROOT = Path(__file__).resolve().parents[1]
BERT_QUERY = "bert.encoder.layer.0.attention.self.query"


def cli(*args) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lora_analysis", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=300)


def validated(text: str) -> dict:
    report = json.loads(text)
    jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)
    return report


@pytest.fixture
def ours(tiny_bert, tmp_path):
    """Our core: r = 4, α = 8 on query/value of a 2-layer BERT; saved in the PEFT layout."""
    model = inject_lora(copy.deepcopy(tiny_bert), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), seed=0)
    randomize_lora(model, 0)
    path = tmp_path / "ours"
    save_adapter(extract_adapter(model), path)
    return path


@pytest.fixture
def bert_base(tmp_path):
    """The tiny BERT's pretrained weights as a Hugging Face model directory (same seed as tiny_bert)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    path = tmp_path / "bert-base"
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture
def peft_bert(tiny_bert, tmp_path):
    """PEFT: r = 8, α = 16 on query/value, random init of both factors, save_pretrained."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(tiny_bert), config)
    path = tmp_path / "peft-bert"
    model.save_pretrained(path)
    return path


@pytest.fixture
def peft_gpt2(tiny_gpt2, tmp_path):
    """PEFT on GPT-2's Conv1D c_attn (fan_in_fan_out), plus the base model directory."""
    peft = pytest.importorskip("peft")
    base = tmp_path / "gpt2-base"
    tiny_gpt2.save_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(tiny_gpt2), config)
    path = tmp_path / "peft-gpt2"
    model.save_pretrained(path)
    return path, base


@pytest.fixture
def kohya(tmp_path):
    """A kohya-layout file written by hand: lora_down = A, lora_up = B, alpha per module."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, (d_out, d_in, r, alpha) in enumerate([(16, 24, 4, 2.0), (24, 16, 2, 1.0)]):
        name = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        tensors[f"{name}.lora_down.weight"] = torch.randn(r, d_in, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(d_out, r, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "kohya_lora.safetensors"
    save_file(tensors, path)
    return path


# ----------------------------------------------------------------------------- analyze


def test_analyze_text_default_report_on_stdout_progress_on_stderr(ours):
    result = cli("analyze", ours)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in ("Summary by projection type", "Summary by layer", "Rank recommendation", "Modules"):
        assert f"\n{section}\n" in out
    assert "0.attention.self.query  32×32  4  8      2" in out  # module, shape, r, α, scale
    assert "Traceback" not in result.stderr and "lora-analysis: analyzing 4 module(s)" in result.stderr
    assert "lora-analysis" not in out  # progress never on stdout


def test_analyze_json_matches_float64_oracle(ours):
    result = cli("analyze", ours, "--format", "json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet
    report = validated(result.stdout)
    adapter = load_adapter(ours)
    assert list(report["modules"]) == list(adapter.modules)
    for name, module in adapter.items():
        entry = report["modules"][name]
        sigma = torch.linalg.svdvals(module.delta_weight(torch.float64))[: module.r].numpy()
        np.testing.assert_allclose(entry["singular_values"], sigma, rtol=1e-5)
        assert entry["frobenius_norm"] == pytest.approx(float(np.sqrt((sigma**2).sum())), rel=1e-5)
        assert entry["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-5)
        assert entry["stable_rank"] == pytest.approx(float((sigma**2).sum() / sigma[0] ** 2), rel=1e-5)
        cumulative = np.cumsum(sigma**2) / (sigma**2).sum()
        assert entry["energy_rank"]["0.9"] == int(np.argmax(cumulative >= 0.9)) + 1
        assert (entry["r"], entry["alpha"], entry["scale"], entry["shape"]) == (4, 8.0, 2.0, [32, 32])


def test_analyze_writes_output_atomically_and_quiet_keeps_stdout_empty(ours, tmp_path):
    out = tmp_path / "reports" / "ours.md"
    out.parent.mkdir()  # outputs never create folders (tests/test_outputs.py)
    assert main(["analyze", str(ours), "--format", "markdown", "-o", str(out), "--quiet"]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# LoRA adapter analysis") and "| bert.encoder.layer.1.attention.self.value |" in text
    assert [p.name for p in out.parent.iterdir()] == ["ours.md"]


def test_analyze_peft_bert_html_with_base(peft_bert, bert_base, tmp_path):
    out = tmp_path / "report.html"
    result = cli("analyze", peft_bert, "--base", bert_base, "--format", "html", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and f"wrote {out}" in result.stderr

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.images, self.external = 0, [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tables += tag == "table"
            if tag == "img":
                self.images.append(attrs.get("src", ""))
            if tag in ("link", "script") or "href" in attrs:
                self.external.append(tag)

    page = Page()
    html = out.read_text(encoding="utf-8")
    page.feed(html)
    assert f"<title>LoRA analysis: {peft_bert.parent.name}/{peft_bert.name}</title>" in html  # no absolute path
    assert str(tmp_path) not in html.split("<body>")[0]
    assert page.tables == 5  # two summaries, recommendation, modules, against the base weights
    assert len(page.images) == 4  # spectra, effective-rank heatmap, amplification heatmap, φ against W
    assert all(src.startswith("data:image/png;base64,") for src in page.images) and page.external == []

    # The page shows the JSON report's numbers, module by module and column by column.
    result = cli("analyze", peft_bert, "--base", bert_base, "--format", "json", "--quiet")
    data = validated(result.stdout)
    tables = html_tables(out.read_text(encoding="utf-8"))
    base, modules = tables["Against the base weights"], tables["Modules"]
    assert sorted(row[0] for row in base[1]) == sorted(data["modules"]) == sorted(row[0] for row in modules[1])
    for module, entry in data["modules"].items():
        b = entry["base"]
        assert float(column(base, "‖W‖_F")[module]) == shown(b["weight_frobenius_norm"], 4)
        for label, key in (("‖UᵀWV‖ ΔW", "delta"), ("‖UᵀWV‖ W", "weight"), ("‖UᵀWV‖ random", "random")):
            assert float(column(base, label)[module]) == shown(b["projection_norms"][key], 4), (module, label)
        assert float(column(base, "amplification")[module]) == shown(b["amplification"], 3)
        assert column(base, "intruders")[module] == f"{b['intruders']['count']}/{b['intruders']['top_k']}"
        assert float(column(modules, "‖ΔW‖_F")[module]) == shown(entry["frobenius_norm"], 4)
        assert float(column(modules, "stable rank")[module]) == shown(entry["stable_rank"], 3)


def test_analyze_peft_gpt2_conv1d_against_base(peft_gpt2):
    adapter_path, base = peft_gpt2
    result = cli("analyze", adapter_path, "--base", base, "--format", "json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = validated(result.stdout)
    from transformers import GPT2LMHeadModel

    weights = GPT2LMHeadModel.from_pretrained(base).state_dict()
    adapter = load_adapter(adapter_path)
    assert set(report["modules"]) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    for name, entry in report["modules"].items():
        module = adapter[name]
        assert entry["fan_in_fan_out"] is True and entry["shape"] == [96, 32] and entry["projection"] == "qkv"
        W = weights[f"{name}.weight"].double().T  # Conv1D stores (d_in, d_out)
        base_entry = entry["base"]
        assert base_entry["base_module"] == name
        assert base_entry["weight_frobenius_norm"] == pytest.approx(float(W.norm()), rel=1e-5)
        # Table 7 oracle: U, V = top-r singular vectors of the materialized ΔW (Linear orientation)
        delta = module.scale * module.B.double() @ module.A.double()
        U, S, Vh = torch.linalg.svd(delta)
        projected = float((U[:, :4].T @ W @ Vh[:4].T).norm())
        assert base_entry["projection_norms"]["delta"] == pytest.approx(projected, rel=1e-4)
        assert base_entry["amplification"] == pytest.approx(float(S.square().sum().sqrt()) / projected, rel=1e-4)
        assert len(base_entry["phi_weight"]["phi"][0]) == 4 and base_entry["phi_weight"]["dim"] == 96
        assert base_entry["intruders"]["top_k"] == 10 and len(base_entry["intruders"]["max_cosines"]) == 10


def test_analyze_kohya_markdown(kohya):
    result = cli("analyze", kohya, "--format", "markdown", "--tau", "0.5", "0.95")
    assert result.returncode == 0, result.stderr
    md = result.stdout
    # Module names as the model names them (issue 10), not kohya's mangled lora name.
    assert "| text\\_model.encoder.layers.0.self\\_attn.q\\_proj | 16×24 | 4 | 2 | 0.5 |" in md
    assert "| r@50% | r@95% |" in md and "(kohya" in md


def test_analyze_module_selection_and_top(ours, capsys):
    assert main(["analyze", str(ours), "--modules", "*.query", "--top", "1", "--format", "json", "--quiet"]) == 0
    report = validated(capsys.readouterr().out)
    assert report["adapter"]["num_modules"] == 4 and report["adapter"]["num_analyzed"] == 2
    assert report["settings"]["modules"] == ["*.query"] and report["settings"]["top"] == 1
    assert len(report["modules"]) == 1 and next(iter(report["modules"])).endswith("query")
    assert report["summary"]["overall"]["modules"] == 2


def test_analyze_pattern_matching_nothing_is_a_usage_error(ours, capsys):
    assert main(["analyze", str(ours), "--modules", "*.dense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ours}: no module matches *.dense" in err and BERT_QUERY in err


def test_analyze_unknown_alpha_says_unknown(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "loralib.pt"
    torch.save({"layer.0.proj.lora_A": torch.randn(2, 8, generator=g), "layer.0.proj.lora_B": torch.randn(8, 2, generator=g)}, path)
    result = cli("analyze", path, "--format", "json")
    assert result.returncode == 0, result.stderr
    entry = validated(result.stdout)["modules"]["layer.0.proj"]
    assert entry["alpha"] is None and entry["scale"] is None
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning and warning[0].startswith("lora-analysis: warning: LoRA alpha unknown")  # one line, no source location


def test_base_missing_the_adapters_module_exits_2_naming_it(tmp_path, ours):
    base = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.attention.self.key.weight": torch.zeros(32, 32)}, base)
    result = cli("analyze", ours, "--base", base)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert BERT_QUERY in result.stderr and str(base) in result.stderr


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path: Path, good: Path) -> dict[str, Path]:
    raw = (good / "adapter_model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((40).to_bytes(8, "little") + b"{not json at all" + b" " * 24 + raw[48:])
    lonely = tmp_path / "a_without_b.safetensors"
    save_file({f"base_model.model.{BERT_QUERY}.lora_A.weight": torch.ones(2, 32)}, lonely)
    pickled = tmp_path / "adapter.bin"  # arbitrary code on load: refused by weights_only
    torch.save({"x.lora_A": torch.ones(2, 2), "x.lora_B": torch.ones(2, 2), "hook": print}, pickled)
    return {"truncated": truncated, "corrupt header": corrupt, "A without B": lonely, "pickle": pickled,
            "missing": tmp_path / "does-not-exist.safetensors"}


@pytest.mark.parametrize("case", ["truncated", "corrupt header", "A without B", "pickle", "missing"])
def test_bad_input_exits_2_with_one_line_naming_the_file(case, ours, tmp_path, capfd):
    path = _bad_inputs(tmp_path, ours)[case]
    assert main(["analyze", str(path)]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("lora-analysis: error: ")
    assert str(path) in err and "Traceback" not in err


def test_bad_input_in_a_fresh_process(ours, tmp_path):
    path = _bad_inputs(tmp_path, ours)["truncated"]
    result = cli("compare", ours, path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"lora-analysis: error: {path}: ")


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("no such file or directory")


def test_usage_errors_exit_2(ours):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(ours), "--tau", "1.5"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(ours), str(ours), "--basis", "C"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- compare


def test_compare_peft_vs_ours_json_with_plot(peft_bert, ours, tmp_path):
    plot = tmp_path / "phi.png"
    result = cli("compare", ours, peft_bert, "--format", "json", "--plot", plot)
    assert result.returncode == 0, result.stderr
    report = validated(result.stdout)
    assert report["basis"] == "A" and report["only_in_a"] == [] and report["only_in_b"] == []
    pair = report["pairs"][BERT_QUERY]
    assert (pair["r_a"], pair["r_b"], pair["dim"]) == (4, 8, 32)
    phi = np.array(pair["phi"], dtype=float)
    assert phi.shape == (4, 8) and np.all((phi >= 0) & (phi <= 1))
    # oracle: right-singular vectors of the two A's, float64
    a, b = load_adapter(ours)[BERT_QUERY].A.double(), load_adapter(peft_bert)[BERT_QUERY].A.double()
    Va, Vb = torch.linalg.svd(a, full_matrices=False).Vh.T, torch.linalg.svd(b, full_matrices=False).Vh.T
    assert phi[0, 0] == pytest.approx(float((Va[:, 0] @ Vb[:, 0]) ** 2), abs=1e-5)
    assert phi[3, 7] == pytest.approx(float((Va.T @ Vb).square().sum()) / 4, abs=1e-5)
    assert pair["chance"]["phi_1_1"] == pytest.approx(1 / 32)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_compare_lists_modules_in_one_adapter_only(ours, tmp_path, capsys):
    adapter = load_adapter(ours)
    save_adapter(adapter.select([n for n in adapter.modules if n.endswith("query")]), tmp_path / "queries")
    plot = tmp_path / "phi.pdf"
    assert main(["compare", str(ours), str(tmp_path / "queries"), "--basis", "dW-left", "--plot", str(plot), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.value" in out.replace("\n", " ") or "0.attention.self.value  A only" in out
    assert "A only" in out and "dW-left" in out
    assert plot.read_bytes().startswith(b"%PDF")
    assert main(["compare", str(ours), str(tmp_path / "queries"), "--format", "json", "--quiet"]) == 0
    report = validated(capsys.readouterr().out)
    assert report["only_in_a"] == ["bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.attention.self.value"]
    assert all(np.allclose(np.diag(np.array(p["phi"], dtype=float)), 1.0, atol=1e-5) for p in report["pairs"].values())


def test_compare_bad_plot_extension_fails_before_work(ours, capsys):
    assert main(["compare", str(ours), str(ours), "--plot", "phi.jpeg"]) == 2
    assert "phi.jpeg: unsupported figure format 'jpeg'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- help, start-up


@pytest.mark.parametrize("command", ["analyze", "compare"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"lora-analysis {command} " in out.split("examples:")[1]


def test_text_analyze_imports_neither_matplotlib_nor_transformers(ours):
    code = ("import sys; from lora_analysis.cli import main; "
            f"code = main(['analyze', {str(ours)!r}, '--quiet']); "
            "heavy = [m for m in ('matplotlib', 'transformers') if m in sys.modules]; "
            "sys.exit(code or (3 if heavy else 0))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


def test_unwritable_output_is_a_usage_error(ours, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["analyze", str(ours), "-o", str(tmp_path / "taken"), "--quiet"]) == 2
    assert f"{tmp_path / 'taken'}: -o names a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    plot = tmp_path / "file" / "phi.png"  # parent is a regular file
    assert main(["compare", str(ours), str(ours), "--plot", str(plot), "--quiet"]) == 2
    assert f"{plot}: --plot: the folder {tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    missing = tmp_path / "missing" / "x.json"  # never created behind the user's back
    assert main(["analyze", str(ours), "-o", str(missing), "--quiet"]) == 2
    assert f"{missing}: -o: the folder {missing.parent} does not exist; outputs never create folders" in capsys.readouterr().err
    assert not missing.parent.exists()


def test_analyze_finds_the_recorded_base_and_no_base_skips_it(ours, bert_base, tmp_path, monkeypatch):
    """An adapter recording a local base directory (relative to the working directory) gets the
    Table 7 section without --base; --no-base turns it off; a hub id is ignored."""
    def recording(base_name: str) -> Path:
        """`ours`, saved again with `base_model_name_or_path` = base_name (config and header agree)."""
        adapter = load_adapter(ours)
        config = dataclasses.replace(adapter.config, base_model_name_or_path=base_name)
        return save_adapter(dataclasses.replace(adapter, config=config), tmp_path / f"records-{base_name.replace('/', '-')}")

    local = recording(bert_base.name)
    monkeypatch.chdir(bert_base.parent)
    assert main(["analyze", str(local), "--format", "json", "-o", str(tmp_path / "auto.json")]) == 0
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["base"] == {"path": bert_base.name} and all(m["base"] for m in report["modules"].values())
    assert main(["analyze", str(local), "--format", "json", "--no-base", "-o", str(tmp_path / "none.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "none.json").read_text())["base"] is None
    hub = recording("org/not-here")
    assert main(["analyze", str(hub), "--format", "json", "-o", str(tmp_path / "hub.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "hub.json").read_text())["base"] is None
