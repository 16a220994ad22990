"""Full fine-tuning's ΔW = W_ft − W₀ through the analysis engine (`ModelPair`, `analyze FT --base
BASE`): every number against the float64 SVD of the materialized difference, the pair read one
module at a time, mismatched checkpoints refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from training_fixtures import save_tiny_bert

from lora_analysis import LoraAnalysisError
from lora_analysis.analysis import AnalysisOptions, analyze_adapter
from lora_analysis.base_weights import BaseWeights
from lora_analysis.cli.main import main
from lora_analysis.model_pair import ModelPair, is_model_checkpoint

PLANTED_RANK = 3


def planted_finetune(base_dir, out_dir, seed: int = 1, noise: float = 1e-5):
    """The base's weights plus, on every 2-D weight, a planted rank-3 ΔW with σ = 1, 0.5, 0.25 (times
    ‖W‖ / 10) plus small noise; a task head `classifier` only the fine-tuned model has."""
    generator = torch.Generator().manual_seed(seed)
    state = load_file(base_dir / "model.safetensors")
    for key, W in state.items():
        if W.ndim == 2 and key.endswith(".weight"):
            k = min(PLANTED_RANK, *W.shape)
            U = torch.linalg.qr(torch.randn(W.shape[0], k, generator=generator, dtype=torch.float64))[0]
            V = torch.linalg.qr(torch.randn(W.shape[1], k, generator=generator, dtype=torch.float64))[0]
            planted = U @ torch.diag(torch.tensor([1.0, 0.5, 0.25][:k], dtype=torch.float64)) @ V.T * float(W.norm()) / 10
            state[key] = (W.double() + planted + noise * torch.randn(W.shape, generator=generator, dtype=torch.float64)).float()
    state["classifier.weight"] = torch.randn(2, 32, generator=generator)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text((base_dir / "config.json").read_text())
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = save_tiny_bert(root / "base")
    return base, planted_finetune(base, root / "ft")


def oracle_singular_values(ft, base, key):
    W_ft, W0 = load_file(ft / "model.safetensors")[key], load_file(base / "model.safetensors")[key]
    return torch.linalg.svdvals(W_ft.double() - W0.double()).numpy()


def test_a_model_directory_is_told_from_an_adapter(models, tmp_path):
    base, ft = models
    assert is_model_checkpoint(ft) and is_model_checkpoint(ft / "model.safetensors")
    lora = {"base_model.model.x.lora_A.weight": torch.zeros(2, 4), "base_model.model.x.lora_B.weight": torch.zeros(4, 2)}
    save_file(lora, tmp_path / "adapter.safetensors")
    assert not is_model_checkpoint(tmp_path / "adapter.safetensors")
    (tmp_path / "run").mkdir()
    save_file(lora, tmp_path / "run" / "adapter_model.safetensors")
    assert not is_model_checkpoint(tmp_path / "run")


def test_spectra_of_the_pair_equal_the_float64_svd_of_the_materialized_difference(models):
    base, ft = models
    pair = ModelPair(ft, base)
    assert pair.only_in_finetuned == ["classifier"] and "pooler.dense" in pair.names
    adapter = pair.adapter()
    assert adapter.kinds == {"dense": len(pair)} and any("classifier" in n for n in adapter.notes)
    analysis = analyze_adapter(adapter, None, AnalysisOptions(device="cpu"), progress=False)
    for name, result in analysis.modules.items():
        expected = oracle_singular_values(ft, base, f"{name}.weight")
        S = result.spectrum.S.numpy()
        np.testing.assert_allclose(S, expected, rtol=1e-12, atol=1e-14 * expected[0])
        assert result.metrics.frobenius == pytest.approx(float(np.sqrt((expected**2).sum())), rel=1e-12)
        if min(result.spectrum.shape) > PLANTED_RANK:
            assert result.metrics.energy_rank[0.99] <= PLANTED_RANK  # the planted spectrum carries > 99 %


def test_the_pair_is_read_one_module_at_a_time(models, monkeypatch):
    base, ft = models
    reads: list[str] = []
    original = BaseWeights._read

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(BaseWeights, "_read", counting)
    adapter = ModelPair(ft, base).adapter()
    assert reads == []  # matching and shapes come from the headers
    names = list(adapter.modules)
    for i, name in enumerate(names[:3]):
        adapter[name]
        assert reads == [key for n in names[: i + 1] for key in (n, n)]


def test_cli_analyze_of_a_fine_tuned_model_against_its_base(models, tmp_path, capsys):
    base, ft = models
    out = tmp_path / "report.json"
    assert main(["analyze", str(ft), "--base", str(base), "--modules", "*query", "--format", "json", "-o", str(out),
                 "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["adapter"]["format"] == "full fine-tuning" and report["adapter"]["kinds"] == {"dense": 2}
    for name, module in report["modules"].items():
        expected = oracle_singular_values(ft, base, f"{name}.weight")
        np.testing.assert_allclose(module["singular_values"], expected, rtol=1e-12, atol=1e-14 * expected[0])
        assert module["base"]["weight_frobenius_norm"] > 0
    assert main(["analyze", str(ft), "--base", str(base), "--format", "json", "-o", str(out), "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err  # the first report is never replaced silently
    assert main(["analyze", str(ft), "--base", str(base), "--format", "json", "-o", str(out), "--force", "--quiet"]) == 0
    every = json.loads(out.read_text())["modules"]
    assert len(every) == 16  # every 2-D weight, the embeddings too; the 2 × 32 token-type one has 2 directions
    assert every["embeddings.token_type_embeddings"]["base"]["intruders"]["top_k"] == 2
    for fmt in ("text", "markdown", "html"):
        assert main(["analyze", str(ft), "--base", str(base), "--modules", "*value", "--format", fmt, "-o",
                     str(tmp_path / f"r.{fmt}"), "--quiet"]) == 0
    assert "dense" in (tmp_path / "r.text").read_text()


def test_a_model_without_base_and_mismatched_pairs_are_refused_in_one_line(models, tmp_path, capsys):
    base, ft = models
    assert main(["analyze", str(ft), "--quiet"]) == 2
    assert "needs the base model (--base" in capsys.readouterr().err
    state = load_file(ft / "model.safetensors")
    state["encoder.layer.0.attention.self.query.weight"] = torch.zeros(16, 32)
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / "model.safetensors")
    assert main(["analyze", str(tmp_path / "bad"), "--base", str(base), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shape (16, 32) in the fine-tuned model and (32, 32) in the base" in err
    del state["encoder.layer.0.attention.self.query.weight"]
    save_file(state, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(LoraAnalysisError, match="missing in the fine-tuned model"):
        ModelPair(tmp_path / "bad", base)


def test_deltas_are_the_float64_difference_rounded_once(models):
    base, ft = models
    pair = ModelPair(ft, base, patterns=["*key"])
    W_ft, W0 = load_file(ft / "model.safetensors"), load_file(base / "model.safetensors")
    deltas = dict(pair.deltas())
    assert sorted(deltas) == ["encoder.layer.0.attention.self.key", "encoder.layer.1.attention.self.key"]
    for name, delta in deltas.items():
        expected = (W_ft[f"{name}.weight"].double() - W0[f"{name}.weight"].double()).float()
        assert delta.dtype == torch.float32 and torch.equal(delta, expected)
