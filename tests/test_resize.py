"""`resize` and `extract`: the best rank-k adapter per module (Eckart–Young), against the float64
SVD of the materialized ΔW; the rank rules; PEFT loads the outputs and merges the same weights;
outputs never overwrite an adapter without --force, nor an input ever."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_model_pair import planted_finetune
from training_fixtures import save_tiny_bert

from lora_analysis import LoraAnalysisError, load_adapter
from lora_analysis.adapters import Adapter, DenseModule, LohaModule, LoraModule
from lora_analysis.analysis.resize import RankRule, resize_adapter
from lora_analysis.cli.main import main

peft = pytest.importorskip("peft")


def oracle(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray]:
    """(ΔW_k, σ) from the float64 SVD of the materialized ΔW."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S.numpy()


def materialized(update) -> torch.Tensor:
    return update.delta_weight(torch.float64)


def random_lora(d_out, d_in, r, seed, alpha=16.0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g), alpha=alpha)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 24), d_in=st.integers(2, 24), r=st.integers(1, 8), k=st.integers(1, 8),
       seed=st.integers(0, 2**16), log_scale=st.sampled_from([-30, 0, 30]))
def test_resize_is_the_truncated_svd_and_its_error_the_spectral_tail(d_out, d_in, r, k, seed, log_scale):
    module = random_lora(d_out, d_in, r, seed, alpha=float(r) * 2.0**log_scale)
    result = resize_adapter(Adapter({"m": module}), RankRule("rank", k), device="cpu", progress=False)
    delta = materialized(module)
    S = oracle(delta, 1)[1]
    rank = int((S > max(delta.shape) * np.finfo(np.float64).eps * S[0]).sum())
    kept = min(k, rank)
    expected, _ = oracle(delta, kept)
    cut = result.modules["m"]
    assert cut.rank == kept and cut.numerical_rank == rank
    tail = float(np.sqrt(np.square(S[kept:]).sum()))
    assert cut.error == pytest.approx(tail, rel=1e-9, abs=1e-12 * S[0])
    assert cut.error == pytest.approx(float((delta - expected).norm()), rel=1e-6, abs=1e-9 * S[0])
    assert cut.energy_kept == pytest.approx(float(np.square(S[:kept]).sum() / np.square(S).sum()), rel=1e-12)
    new = result.adapter["m"]
    assert new.r == kept and new.alpha == kept and new.scale == 1.0
    if kept < min(delta.shape) and kept < len(S) and S[kept - 1] - S[kept] < 1e-3 * S[0]:
        return  # a (near-)tie at σ_k: ΔW_k is not unique
    torch.testing.assert_close(materialized(new), expected, rtol=0, atol=1e-5 * float(S[0]))


@pytest.mark.parametrize("kind", ["loha", "dense"])
def test_any_kind_resizes_to_the_truncation_of_its_delta(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "loha":
        module = LohaModule(w1_a=torch.randn(20, 2, generator=g), w1_b=torch.randn(2, 18, generator=g),
                            w2_a=torch.randn(20, 3, generator=g), w2_b=torch.randn(3, 18, generator=g), alpha=2.0, divisor=2.0)
    else:
        module = DenseModule(delta=torch.randn(20, 18, generator=g, dtype=torch.float64), alpha=1.0, divisor=1.0)
    result = resize_adapter(Adapter({"m": module}), RankRule("rank", 3), device="cpu", progress=False)
    expected, S = oracle(materialized(module), 3)
    torch.testing.assert_close(materialized(result.adapter["m"]), expected, rtol=0, atol=1e-5 * float(S[0]))
    assert result.modules["m"].error == pytest.approx(float(np.sqrt(np.square(S[3:]).sum())), rel=1e-10)


def test_rank_rules_per_module_against_the_oracle_spectrum():
    g = torch.Generator().manual_seed(0)
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(16, 6, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))[0]
    adapter = Adapter({"m": DenseModule(delta=U * spectrum @ V.T, alpha=1.0, divisor=1.0)})
    energy = np.cumsum(spectrum.numpy() ** 2) / (spectrum.numpy() ** 2).sum()  # .762 .952 .9995 ...

    def rank(kind, value):
        return resize_adapter(adapter, RankRule(kind, value), device="cpu", progress=False).modules["m"].rank

    assert rank("rank", 3) == 3 and rank("rank", 100) == 6
    assert rank("energy", 0.95) == int(np.searchsorted(energy, 0.95) + 1) == 3
    assert rank("energy", 0.9) == 2 and rank("energy", 1.0) == 6
    assert rank("sv_ratio", 4) == 3 and rank("sv_ratio", 1) == 1  # σᵢ ≥ σ₁/4 = 2: 8, 4, 2
    assert rank("fro", 0.9) == rank("energy", 0.81) == 2  # √0.762 = 0.873 < 0.9 ≤ √0.952
    for kind, value in (("energy", 0.0), ("energy", 1.5), ("sv_ratio", 0.5), ("fro", 2.0), ("rank", 0.5)):
        with pytest.raises(LoraAnalysisError):
            RankRule(kind, value)


def peft_lora(base, tmp_path, rank_pattern=None):
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      rank_pattern=rank_pattern or {}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    model.save_pretrained(tmp_path / "peft")
    return model


def merged_linear_weights(peft_model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {name: module.weight.detach().double() for name, module in merged.named_modules()
            if isinstance(module, torch.nn.Linear)}


def test_peft_loads_a_resized_adapter_and_merges_the_truncated_delta(tiny_bert, tmp_path, capsys):
    pristine = copy.deepcopy(tiny_bert)
    original = peft_lora(tiny_bert, tmp_path, rank_pattern={"value": 4})
    capsys.readouterr()
    assert main(["resize", str(tmp_path / "peft"), "--rank", "2", "-o", str(tmp_path / "r2"), "--format", "json",
                 "--quiet"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {m["rank"] for m in table["modules"]} == {2} and table["parameters_after"] < table["parameters_before"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "r2").eval()
    result = loaded.load_adapter(tmp_path / "r2", adapter_name="check")
    assert [k for k in result.missing_keys if ".check." in k] == [] and result.unexpected_keys == []
    before, after = merged_linear_weights(original), merged_linear_weights(loaded)
    base = {name: m.weight.detach().double() for name, m in pristine.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = {m["module"]: m for m in table["modules"]}
    for name, W in base.items():
        if not name.endswith(("query", "value")):
            torch.testing.assert_close(after[name], W)
            continue
        expected, S = oracle(before[name] - W, 2)
        torch.testing.assert_close(after[name] - W, expected, rtol=0, atol=1e-5 * float(S[0]))
        assert rows[name]["error"] == pytest.approx(float(np.sqrt(np.square(S[2:]).sum())), rel=1e-4)


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = save_tiny_bert(root / "base")
    return base, planted_finetune(base, root / "ft", noise=1e-4)


def test_extract_is_resize_of_the_dense_pair_and_peft_loads_it(model_pair, tmp_path, capsys):
    from transformers import BertModel

    base, ft = model_pair
    assert main(["extract", str(ft), "--base", str(base), "--rank", "3", "-o", str(tmp_path / "x.safetensors"),
                 "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "embeddings" in captured.err  # left out: not nn.Linear
    table = json.loads(captured.out)
    names = [m["module"] for m in table["modules"]]
    assert "encoder.layer.0.attention.self.query" in names and not any("embeddings" in n for n in names)
    adapter = load_adapter(tmp_path / "x.safetensors")
    W_ft, W0 = load_file(ft / "model.safetensors"), load_file(base / "model.safetensors")
    for row in table["modules"]:
        key = row["module"] + ".weight"
        expected, S = oracle(W_ft[key].double() - W0[key].double(), 3)
        assert row["error"] == pytest.approx(float(np.sqrt(np.square(S[3:]).sum())), rel=1e-9)
        torch.testing.assert_close(materialized(adapter[row["module"]]), expected, rtol=0, atol=1e-5 * float(S[0]))
        assert row["energy_kept"] > 0.99  # the planted rank-3 change dominates the noise

    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes())
    assert main(["extract", str(ft), "--base", str(base), "--rank", "3", "-o", str(tmp_path / "dir"), "--quiet"]) == 0
    model = peft.PeftModel.from_pretrained(BertModel.from_pretrained(base), tmp_path / "dir").eval()
    merged = model.merge_and_unload()
    weight = merged.encoder.layer[1].attention.self.value.weight.detach().double()
    key = "encoder.layer.1.attention.self.value.weight"
    expected, S = oracle(W_ft[key].double() - W0[key].double(), 3)
    torch.testing.assert_close(weight - W0[key].double(), expected, rtol=0, atol=1e-5 * float(S[0]))


def test_outputs_are_never_overwritten_without_force_nor_an_input_ever(model_pair, tmp_path, capsys):
    base, ft = model_pair
    args = ["extract", str(ft), "--base", str(base), "--energy", "0.9", "--quiet", "--modules", "*query"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    first = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    assert main([*args, "-o", str(tmp_path / "out")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == first  # deterministic
    out = str(tmp_path / "out")
    assert main(["resize", out, "--rank", "1", "-o", out, "--force", "--quiet"]) == 2
    assert "would write over the input" in capsys.readouterr().err
    assert main(["resize", out, "--rank", "1", "-o", str(tmp_path / "out" / "adapter_model.safetensors"), "--force",
                 "--quiet"]) == 2
    assert main(["resize", str(ft), "--rank", "1", "-o", str(tmp_path / "o2"), "--quiet"]) == 2  # a model, not an adapter
    assert main(["resize", out, "--sv-ratio", "0.5", "-o", str(tmp_path / "o3"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lora-analysis: error:") and "--sv-ratio must be ≥ 1" in err[-1]


def test_unknown_alpha_is_refused_and_gpt2_conv1d_adapters_round_trip_through_peft(tiny_gpt2, tmp_path, capsys):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    bare = {"base_model.model.h.0.attn.c_attn.lora_A.weight": torch.randn(4, 32, generator=g),
            "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.randn(96, 4, generator=g)}
    save_file(bare, tmp_path / "bare.safetensors")
    assert main(["resize", str(tmp_path / "bare.safetensors"), "--rank", "2", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "pass --alpha" in capsys.readouterr().err

    pristine = copy.deepcopy(tiny_gpt2)
    model = peft.get_peft_model(tiny_gpt2, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    model.save_pretrained(tmp_path / "peft")
    before = copy.deepcopy(model).merge_and_unload()
    assert main(["resize", str(tmp_path / "peft"), "--rank", "3", "-o", str(tmp_path / "r3"), "--quiet"]) == 0
    after = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "r3").merge_and_unload()
    W0 = pristine.transformer.h[1].attn.c_attn.weight.detach().double()  # Conv1D: (d_in, d_out)
    delta = before.transformer.h[1].attn.c_attn.weight.detach().double() - W0
    expected, S = oracle(delta, 3)
    torch.testing.assert_close(after.transformer.h[1].attn.c_attn.weight.detach().double() - W0, expected,
                               rtol=0, atol=1e-5 * float(S[0]))


def test_compare_a_full_fine_tune_with_the_lora_extracted_from_it(model_pair, tmp_path, capsys):
    """The extracted rank-3 adapter spans exactly the top-3 directions of W_ft − W₀: φ(i, i) = 1."""
    base, ft = model_pair
    assert main(["extract", str(ft), "--base", str(base), "--rank", "3", "--modules", "*query", "-o",
                 str(tmp_path / "x"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compare", str(ft), str(tmp_path / "x"), "--base", str(base), "--modules", "*query", "--format", "json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["pairs"]) == 2
    for pair in report["pairs"].values():
        phi = np.array(pair["phi"], dtype=float)
        np.testing.assert_allclose(np.diag(phi)[:3], 1.0, atol=1e-6)
