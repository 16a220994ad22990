"""Base weights from directories, sharded checkpoints, single files and in-memory models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_analysis import BaseWeights, LoraConfig, extract_adapter, inject_lora, merge_lora
from lora_analysis.errors import LoraAnalysisError, ModuleResolutionError
from lora_test_utils import randomize_lora

QUERY = "bert.encoder.layer.0.attention.self.query"


def bert_weight(model, name):
    return model.get_submodule(name).weight.detach()


def test_in_memory_model_resolves_prefixes(tiny_bert):
    base = BaseWeights(tiny_bert)
    assert QUERY in base.names
    W = base.weight("encoder.layer.0.attention.self.query")  # adapter trained on a bare encoder
    torch.testing.assert_close(W, bert_weight(tiny_bert, QUERY))
    torch.testing.assert_close(base.weight(f"base_model.model.{QUERY}"), W)
    assert W.dtype == torch.float32 and W.shape == (32, 32)


def test_any_wrapped_layer_gives_its_base_weight():
    """In-memory models are read through the `WrappedLayer` protocol, not the LoRA core: a
    wrapper of another library (PEFT-style `get_base_layer()` / `merged`) works the same, its
    own trainable layers are not base weights, and a merged wrapper is refused."""
    from torch import nn

    class Wrapper(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.adapter_down, self.merged = base, nn.Linear(4, 2), False

        def get_base_layer(self):
            return self.base_layer

    model = nn.Sequential()
    model.add_module("proj", Wrapper(nn.Linear(4, 3)))
    model.add_module("head", nn.Linear(3, 2))
    base = BaseWeights(model)
    assert base.names == ["proj", "head"]
    assert torch.equal(base.weight("proj"), model.proj.base_layer.weight)
    model.proj.merged = True
    with pytest.raises(LoraAnalysisError, match="LoRA layer proj is merged"):
        BaseWeights(model)


@pytest.mark.parametrize("layout", ["directory", "sharded", "single file", "bin"])
def test_files_read_lazily_and_resolve(tiny_bert, tmp_path, layout):
    if layout == "bin":
        source = tmp_path / "pytorch_model.bin"
        torch.save(tiny_bert.state_dict(), source)
    elif layout == "single file":
        source = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in tiny_bert.state_dict().items()}, source)
    else:
        tiny_bert.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "5GB")
        source = tmp_path
        assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
    base = BaseWeights(source)
    for name in (QUERY, "bert.encoder.layer.1.output.dense", "classifier"):
        torch.testing.assert_close(base.weight(name), bert_weight(tiny_bert, name))
    torch.testing.assert_close(base.weight("encoder.layer.0.attention.self.query"), bert_weight(tiny_bert, QUERY))
    assert len(base) == len([m for m in tiny_bert.modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 2])


def test_unresolvable_name_lists_closest(tiny_bert):
    with pytest.raises(ModuleResolutionError, match=r"not found in the base weights .*closest: .*attention\.self\.query"):
        BaseWeights(tiny_bert).weight("encoder.layer.0.attention.self.querry")


def test_gpt2_conv1d_weights_are_transposed_to_linear_orientation(tiny_gpt2, tmp_path):
    """W + s·B·A from BaseWeights equals the merged model's weight, for Conv1D (square and not)."""
    tiny_gpt2.save_pretrained(tmp_path)  # HF layout: Conv1D weights stored as (d_in, d_out)
    model = inject_lora(tiny_gpt2, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"]), seed=0)
    randomize_lora(model, seed=1)
    adapter = extract_adapter(model)
    in_memory = BaseWeights(model)  # LoRA-wrapped layers give their frozen base weight
    before = {name: in_memory.weight(name, adapter[name]) for name in adapter}
    from_file = BaseWeights(tmp_path)
    merge_lora(model)
    shapes = set()
    for name, m in adapter.items():
        assert m.fan_in_fan_out
        merged = model.get_submodule(name).base.weight.detach().T  # Conv1D storage → (d_out, d_in)
        expected = merged - m.scale * (m.B @ m.A)
        torch.testing.assert_close(before[name], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_file.weight(name, m), expected, atol=1e-6, rtol=0)
        shapes.add(before[name].shape)
    assert (32, 32) in shapes and (96, 32) in shapes  # square c_proj and non-square c_attn
    with pytest.raises(LoraAnalysisError, match="merged"):
        BaseWeights(model)


def test_in_memory_orientation_from_the_layer_type_and_shape_mismatch(tiny_bert):
    from lora_analysis import LoraModule

    base = BaseWeights(tiny_bert)
    name = "bert.encoder.layer.0.intermediate.dense"  # (64, 32)
    linear = LoraModule(A=torch.zeros(2, 32), B=torch.zeros(64, 2), alpha=2)
    torch.testing.assert_close(base.weight(name, linear), bert_weight(tiny_bert, name))
    flagged = LoraModule(A=torch.zeros(2, 32), B=torch.zeros(64, 2), alpha=2, fan_in_fan_out=True)
    torch.testing.assert_close(base.weight(name, flagged), bert_weight(tiny_bert, name))  # an nn.Linear: its type decides
    wrong = LoraModule(A=torch.zeros(2, 30), B=torch.zeros(64, 2), alpha=2)
    with pytest.raises(LoraAnalysisError, match=r"stored as \(64, 32\).*\(64, 30\)"):
        base.weight(name, wrong)


@pytest.mark.parametrize("d_out, d_in", [(6, 4), (5, 5)])
def test_file_orientation_comes_from_the_adapters_record_never_from_the_shape(tmp_path, d_out, d_in):
    """A transposed weight beside an adapter that records nn.Linear is refused (it was silently
    taken for a Conv1D); with fan_in_fan_out it is a Conv1D. A square one follows the record."""
    from safetensors.torch import save_file

    from lora_analysis import LoraModule

    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))
    stored_t = tmp_path / "transposed.safetensors"
    save_file({"m.weight": W.T.contiguous()}, stored_t)
    linear = LoraModule(A=torch.zeros(2, d_in), B=torch.zeros(d_out, 2), alpha=2)
    conv1d = LoraModule(A=torch.zeros(2, d_in), B=torch.zeros(d_out, 2), alpha=2, fan_in_fan_out=True)
    torch.testing.assert_close(BaseWeights(stored_t).weight("m", conv1d), W)
    if d_out != d_in:
        with pytest.raises(LoraAnalysisError, match=r"transposed.safetensors: weight m is stored as \(4, 6\).*"
                                                    r"fan_in_fan_out=false.*never guessed"):
            BaseWeights(stored_t).weight("m", linear)
    else:  # square: the record resolves it (W.T is what a Linear with this storage holds)
        torch.testing.assert_close(BaseWeights(stored_t).weight("m", linear), W.T)


def test_bad_sources_give_one_line_errors(tmp_path, tiny_bert):
    with pytest.raises(LoraAnalysisError, match="no such file"):
        BaseWeights(tmp_path / "missing")
    with pytest.raises(LoraAnalysisError, match="no model weights"):
        BaseWeights(tmp_path)
    package = tmp_path / "package"  # an installed model package: the weights sit in model/
    tiny_bert.save_pretrained(package / "model")
    with pytest.raises(LoraAnalysisError, match=r"model/ holds them: pass .*package/model$"):
        BaseWeights(package)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraAnalysisError, match="bad.safetensors: cannot read safetensors header"):
        BaseWeights(bad)
    pickle = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2, 2), "f": print}, pickle)
    with pytest.raises(LoraAnalysisError) as refused:
        BaseWeights(pickle)
    message = str(refused.value)  # one line of ours, never torch's advice to load with weights_only=False
    assert "evil.bin: refused pickle" in message and "GLOBAL print" in message
    assert "\n" not in message and "weights_only=False" not in message and "trust" not in message
    sharded = tmp_path / "sharded"
    tiny_bert.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / next(iter(index["weight_map"].values()))).unlink()
    with pytest.raises(LoraAnalysisError, match="shard file"):
        BaseWeights(sharded)
    nan = tmp_path / "nan.safetensors"
    save_file({"layer.weight": torch.full((2, 2), float("nan"))}, nan)
    with pytest.raises(LoraAnalysisError, match="not finite"):
        BaseWeights(nan).weight("layer")


@pytest.mark.integration
def test_minilm_checkpoint_without_bert_prefix():
    from lora_analysis.assets import asset_path

    base = BaseWeights(asset_path("minilm"))
    W = base.weight("bert.encoder.layer.5.attention.self.value")  # classification-model name
    assert W.shape == (384, 384) and torch.isfinite(W).all()
    assert base.resolve("base_model.model.bert.encoder.layer.5.attention.self.value") == "encoder.layer.5.attention.self.value"


@pytest.mark.integration
def test_builtin_name_is_a_base(tiny_bert):
    base = BaseWeights("minilm")
    assert base.source == "minilm" and base.weight("bert.encoder.layer.0.attention.self.query").shape == (384, 384)


def test_recorded_base_names_only_builtins_and_local_directories(tiny_bert, tmp_path, monkeypatch):
    from lora_analysis.base_weights import recorded_base

    adapter = extract_adapter(inject_lora(tiny_bert, LoraConfig(r=2, target_modules=["query"]), seed=0))
    monkeypatch.chdir(tmp_path)
    for recorded, expected in (("minilm", "minilm"), ("org/hub-model", None), (None, None), ("here", None)):
        adapter.config.base_model_name_or_path = recorded
        assert recorded_base(adapter) == expected
    tiny_bert.save_pretrained(tmp_path / "here")  # a local directory with weights, relative to the working directory
    adapter.config.base_model_name_or_path = "here"
    assert recorded_base(adapter) == "here"
