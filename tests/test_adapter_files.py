"""Adapter files: save → load round trips, the formats we read, and apply_adapter."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_analysis import (
    Adapter,
    LoraAnalysisError,
    LoraConfig,
    LoraModule,
    ModuleResolutionError,
    apply_adapter,
    extract_adapter,
    inject_lora,
    load_adapter,
    save_adapter,
)
from lora_analysis.lora import named_lora_layers, trainable_parameters
from lora_test_utils import assert_adapters_identical, randomize_lora

Q0 = "bert.encoder.layer.0.attention.self.query"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def bert_lora(tiny_bert):
    """A 'trained' BERT LoRA model: per-module r/α from patterns, classifier in modules_to_save."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                        alpha_pattern={"value": 3}, modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = randomize_lora(inject_lora(copy.deepcopy(tiny_bert), config, seed=0))  # tiny_bert stays the base
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    return model


@pytest.mark.parametrize("target", ["adapter_dir", "lone.safetensors"])
def test_round_trip_is_bit_identical(bert_lora, tmp_path, target):
    adapter = extract_adapter(bert_lora)
    assert set(adapter.extra_tensors) == {"classifier.weight", "classifier.bias"}
    written = save_adapter(adapter, tmp_path / target)
    loaded = load_adapter(written)
    assert loaded.source_format == "ours"
    assert_adapters_identical(adapter, loaded)
    assert loaded.ranks[Q0] == 4 and loaded.ranks[Q0.replace("query", "value")] == 2
    assert loaded[Q0.replace("query", "value")].alpha == 3.0
    assert loaded.config.modules_to_save == ["classifier"] and loaded.config.task_type == "SEQ_CLS"
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temp files left behind


def test_directory_layout_is_peft(bert_lora, tmp_path):
    save_adapter(extract_adapter(bert_lora), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"value": 2} and config["alpha_pattern"] == {"value": 3}
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert f.get_tensor(f"base_model.model.{Q0}.lora_A.weight").shape == (4, 32)
        assert f.get_tensor(f"base_model.model.{Q0}.lora_B.weight").shape == (32, 4)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert len(keys) == 2 * 4 + 2
    assert metadata["format"] == "pt" and json.loads(metadata["adapter_config"]) == config


def test_arbitrary_per_module_rank_and_alpha_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shapes = {"layers.0.proj": (3, 10, 12), "layers.1.proj": (5, 10, 12), "layers.10.proj": (3, 7, 12)}
    alphas = {"layers.0.proj": 6.0, "layers.1.proj": 2.5, "layers.10.proj": 6.0}
    modules = {
        n: LoraModule(A=torch.randn(r, d_in, generator=gen), B=torch.randn(d_out, r, generator=gen), alpha=alphas[n])
        for n, (r, d_in, d_out) in shapes.items()
    }
    adapter = Adapter(modules, LoraConfig(r=8, lora_alpha=1, target_modules=list(modules)))
    save_adapter(adapter, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # The config's r=8/α=1 fit no module: most common value + exact (escaped) names for the rest.
    assert (config["r"], config["lora_alpha"]) == (3, 6)
    assert config["rank_pattern"] == {re.escape("layers.1.proj"): 5}
    assert config["alpha_pattern"] == {re.escape("layers.1.proj"): 2.5}
    loaded = load_adapter(tmp_path / "a")
    assert_adapters_identical(adapter, loaded)
    assert loaded.config.rank_for("layers.10.proj") == 3  # "layers.1.proj" pattern does not leak


def test_rslora_conv1d_bf16_round_trip(tiny_gpt2, tmp_path):
    model = randomize_lora(inject_lora(tiny_gpt2, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], use_rslora=True)))
    adapter = extract_adapter(model)
    for m in adapter.modules.values():
        m.A, m.B = m.A.to(torch.bfloat16), m.B.to(torch.bfloat16)
    loaded = load_adapter(save_adapter(adapter, tmp_path / "g.safetensors"))
    assert_adapters_identical(adapter, loaded)
    module = loaded["transformer.h.0.attn.c_attn"]
    assert module.fan_in_fan_out and module.use_rslora and module.scale == 16 / 2
    assert module.delta_weight().shape == (32, 96)  # Conv1D storage orientation


def test_unknown_alpha_round_trips_as_unknown(tmp_path):
    with pytest.warns(UserWarning, match="alpha unknown"):
        adapter = Adapter({"fc": LoraModule(torch.ones(2, 4), torch.ones(3, 2), alpha=None)})
    save_adapter(adapter, tmp_path / "u")
    assert json.loads((tmp_path / "u" / "adapter_config.json").read_text())["lora_alpha"] == 2  # s = 1 for PEFT
    with pytest.warns(UserWarning, match="alpha unknown"):
        loaded = load_adapter(tmp_path / "u")
    assert loaded["fc"].alpha is None and not loaded.alpha_known
    assert load_adapter(tmp_path / "u", alpha=4.0)["fc"].scale == 2.0


def test_no_absolute_path_in_config(bert_lora, tmp_path):
    adapter = extract_adapter(bert_lora)
    adapter.config.base_model_name_or_path = str(tmp_path / "models" / "minilm")
    save_adapter(adapter, tmp_path / "out")
    save_adapter(adapter, tmp_path / "lone.safetensors")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == "minilm"
    for f in (tmp_path / "out" / "adapter_model.safetensors", tmp_path / "lone.safetensors"):
        assert str(tmp_path) not in f.read_bytes().decode("latin-1")
    adapter.config.base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    assert load_adapter(save_adapter(adapter, tmp_path / "hub")).config.base_model_name_or_path == adapter.config.base_model_name_or_path


def test_lone_file_is_self_describing(bert_lora, tmp_path):
    adapter = extract_adapter(bert_lora)
    save_adapter(adapter, tmp_path / "out")
    alone = tmp_path / "elsewhere" / "copy.safetensors"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "out" / "adapter_model.safetensors", alone)
    assert_adapters_identical(adapter, load_adapter(alone))


def _peft_file_without_header_config(adapter, path):
    tensors = {f"base_model.model.{n}.lora_{p}.weight": getattr(m, p).contiguous() for n, m in adapter.items() for p in "AB"}
    save_file(tensors, path, metadata={"format": "pt"})


def test_peft_lone_file_with_config_beside_or_none(bert_lora, tmp_path):
    adapter = extract_adapter(bert_lora).select([Q0])
    save_adapter(adapter, tmp_path / "out")
    _peft_file_without_header_config(adapter, tmp_path / "out" / "weights.safetensors")
    beside = load_adapter(tmp_path / "out" / "weights.safetensors")
    assert beside.source_format == "peft" and beside[Q0].alpha == 8.0

    (tmp_path / "bare").mkdir()
    _peft_file_without_header_config(adapter, tmp_path / "bare" / "weights.safetensors")
    with pytest.warns(UserWarning, match="alpha unknown"):
        bare = load_adapter(tmp_path / "bare" / "weights.safetensors")
    assert bare[Q0].alpha is None and bare[Q0].scale == 1.0
    assert torch.equal(bare[Q0].A, adapter[Q0].A)
    assert load_adapter(tmp_path / "bare" / "weights.safetensors", alpha=8)[Q0].scale == 2.0


def test_kohya_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 20, generator=gen), torch.randn(30, 4, generator=gen)
    conv_down, conv_up = torch.randn(2, 8, 3, 3, generator=gen), torch.randn(16, 2, 1, 1, generator=gen)
    save_file({
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
        "lora_unet_conv_in.lora_down.weight": conv_down,
        "lora_unet_conv_in.lora_up.weight": conv_up,  # no alpha: α = r
    }, tmp_path / "k.safetensors")
    adapter = load_adapter(tmp_path / "k.safetensors")
    assert adapter.source_format == "kohya" and adapter.alpha_known
    # Module names as the model names them (issue 10): component, then the demangled path.
    q_name, conv_name = "text_encoder/text_model.encoder.layers.0.self_attn.q_proj", "unet/conv_in"
    assert list(adapter.modules) == [q_name, conv_name]
    q = adapter[q_name]
    assert torch.equal(q.A, down) and torch.equal(q.B, up) and q.scale == 0.5
    torch.testing.assert_close(q.delta_weight(), 0.5 * up @ down)
    conv = adapter[conv_name]
    assert (conv.r, conv.d_in, conv.d_out, conv.scale) == (2, 8 * 9, 16, 1.0)
    torch.testing.assert_close(conv.delta_weight().flatten(1), conv_up.flatten(1) @ conv_down.flatten(1))
    assert conv.delta_weight().shape == (16, 8, 3, 3)  # the conv kernel's storage shape
    assert adapter.config.rank_for("unet/conv_in") == 2 and adapter.config.alpha_for("unet/conv_in") == 2.0


def test_loralib_torch_file(tmp_path):
    A, B, bias = torch.randn(4, 12), torch.randn(6, 4), torch.randn(6)
    torch.save({"blocks.0.attn.q.lora_A": A, "blocks.0.attn.q.lora_B": B, "blocks.0.attn.q.bias": bias}, tmp_path / "l.pt")
    with pytest.warns(UserWarning, match="alpha unknown"):
        adapter = load_adapter(tmp_path / "l.pt")
    assert adapter.source_format == "loralib" and adapter["blocks.0.attn.q"].alpha is None
    assert torch.equal(adapter["blocks.0.attn.q"].A, A) and torch.equal(adapter.extra_tensors["blocks.0.attn.q.bias"], bias)
    assert load_adapter(tmp_path / "l.pt", alpha=8)["blocks.0.attn.q"].scale == 2.0


def test_apply_adapter_reproduces_outputs(bert_lora, tiny_bert, token_ids, tmp_path):
    expected = logits(bert_lora, token_ids)
    assert not torch.allclose(logits(tiny_bert, token_ids), expected)
    save_adapter(extract_adapter(bert_lora), tmp_path / "a")
    adapter = load_adapter(tmp_path / "a")
    model = apply_adapter(tiny_bert, adapter)
    torch.testing.assert_close(logits(model, token_ids), expected, rtol=0, atol=0)
    assert {n: l.r for n, l in named_lora_layers(model)} == adapter.ranks
    assert {"classifier.weight", "classifier.bias"} <= set(trainable_parameters(model))
    assert_adapters_identical(adapter, extract_adapter(model))


def test_apply_resolves_prefixes_and_is_strict(tiny_bert, token_ids):
    gen = torch.Generator().manual_seed(0)
    bare_name = "encoder.layer.1.attention.self.value"  # as a bare BertModel names it
    adapter = Adapter({bare_name: LoraModule(torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen), alpha=4)})
    model = apply_adapter(copy.deepcopy(tiny_bert), adapter)
    layer = model.bert.encoder.layer[1].attention.self.value
    assert torch.equal(layer.lora_B, adapter[bare_name].B) and layer.scale == 2.0

    stray = Adapter({**adapter.modules, "encoder.layer.7.attention.self.value": adapter[bare_name]})
    untouched = copy.deepcopy(tiny_bert)
    with pytest.raises(ModuleResolutionError, match=r"encoder\.layer\.7"):
        apply_adapter(untouched, stray)
    assert not list(named_lora_layers(untouched))  # nothing applied before the error
    with pytest.warns(UserWarning, match=r"skipped 1 name.*layer\.7"):
        lenient = apply_adapter(copy.deepcopy(tiny_bert), stray, strict=False)
    assert len(list(named_lora_layers(lenient))) == 1


def test_apply_rejects_wrong_shape_and_type(tiny_bert):
    wrong_shape = Adapter({Q0: LoraModule(torch.ones(2, 31), torch.ones(32, 2), alpha=2)})
    with pytest.raises(LoraAnalysisError, match="shape mismatch"):
        apply_adapter(tiny_bert, wrong_shape)
    not_linear = Adapter({"bert.embeddings.LayerNorm": LoraModule(torch.ones(2, 32), torch.ones(32, 2), alpha=2)})
    with pytest.raises(LoraAnalysisError, match="LayerNorm"):
        apply_adapter(tiny_bert, not_linear)
    extra = Adapter({Q0: LoraModule(torch.ones(2, 32), torch.ones(32, 2), alpha=2)},
                    extra_tensors={"classifier.weight": torch.ones(3, 32)})
    with pytest.raises(LoraAnalysisError, match="classifier.weight"):
        apply_adapter(tiny_bert, extra)


def test_safetensors_detected_by_content_not_name(tmp_path):
    """A header length whose low byte is 0x80 looks like a pickle's first byte: still safetensors."""
    tensors = {"fc.lora_A": torch.ones(2, 3), "fc.lora_B": torch.ones(4, 2)}
    for pad in range(300):
        path = tmp_path / "adapter.bin"
        save_file(tensors, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert load_adapter(path, alpha=2)["fc"].r == 2


def test_apply_checks_modules_to_save_before_changing_the_model(tiny_gpt2):
    adapter = Adapter({"transformer.h.0.attn.c_attn": LoraModule(torch.ones(2, 32), torch.ones(96, 2), alpha=2)},
                      LoraConfig(modules_to_save=["classifier"]))
    with pytest.raises(LoraAnalysisError, match="classifier"):
        apply_adapter(tiny_gpt2, adapter)
    assert not list(named_lora_layers(tiny_gpt2))


def test_apply_unknown_alpha_uses_scale_one_and_refuses_duplicates(tiny_bert):
    name = "bert.encoder.layer.0.attention.self.value"
    with pytest.warns(UserWarning, match="alpha unknown"):
        unknown = Adapter({name: LoraModule(torch.ones(3, 32), torch.ones(32, 3), alpha=None, use_rslora=True)})
    layer = apply_adapter(copy.deepcopy(tiny_bert), unknown).bert.encoder.layer[0].attention.self.value
    assert layer.scale == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="alpha unknown"):
        twice = Adapter({name: unknown[name], name.removeprefix("bert."): unknown[name]})
    with pytest.raises(LoraAnalysisError, match="same model module"):
        apply_adapter(tiny_bert, twice)


def test_equal_adapters_are_byte_identical_files(tmp_path, tiny_bert):
    """safetensors orders header metadata at random; save_adapter must not."""
    from lora_analysis import LoraConfig, extract_adapter, inject_lora, save_adapter

    adapter = extract_adapter(inject_lora(tiny_bert, LoraConfig(r=4, modules_to_save=["classifier"]), seed=0))
    files = [save_adapter(adapter, tmp_path / f"a{i}.safetensors").read_bytes() for i in range(8)]
    assert all(f == files[0] for f in files)
    dirs = [save_adapter(adapter, tmp_path / f"d{i}") / "adapter_model.safetensors" for i in range(4)]
    assert all(d.read_bytes() == dirs[0].read_bytes() for d in dirs)
