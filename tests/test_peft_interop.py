"""PEFT interop both ways: PEFT loads our files; we load PEFT's and reproduce its ΔW and outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_analysis import LoraConfig, apply_adapter, extract_adapter, inject_lora, load_adapter, save_adapter
from lora_test_utils import randomize_lora

peft = pytest.importorskip("peft")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_adapter_keys(keys):
    return [k for k in keys if ".check." in k or k.endswith(".check")]


@pytest.mark.parametrize(
    "fixture,config",
    [
        ("tiny_bert", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                                 alpha_pattern={"query": 5}, modules_to_save=["classifier"], task_type="SEQ_CLS")),
        ("tiny_gpt2", LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM")),
        ("tiny_gpt2", LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], use_rslora=True)),
    ],
)
def test_peft_loads_our_adapter(request, fixture, config, token_ids, tmp_path):
    base = request.getfixturevalue(fixture)
    ours = randomize_lora(inject_lora(copy.deepcopy(base), config, seed=0))
    if config.modules_to_save:
        with torch.no_grad():
            ours.classifier.weight.add_(1.0)
    save_adapter(extract_adapter(ours), tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    result = theirs.load_adapter(tmp_path / "adapter", adapter_name="check")
    assert peft_adapter_keys(result.missing_keys) == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(theirs, token_ids), logits(ours, token_ids), rtol=1e-6, atol=1e-6)
    with theirs.disable_adapter():
        assert not torch.allclose(logits(theirs, token_ids), logits(ours, token_ids), atol=1e-3)  # the adapter matters


def _peft_trained(base, peft_config, seed=0):
    model = peft.get_peft_model(base, peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize(
    "fixture,peft_kwargs",
    [
        ("tiny_bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
        ("tiny_bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=True,
                           rank_pattern={"value": 2}, alpha_pattern={r"layer\.1\.attention\.self\.query": 3},
                           modules_to_save=["classifier"])),
        ("tiny_gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn"])),  # PEFT sets fan_in_fan_out itself
    ],
)
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_we_load_peft_adapter(request, fixture, peft_kwargs, token_ids, tmp_path):
    base = request.getfixturevalue(fixture)
    pristine = copy.deepcopy(base)
    theirs = _peft_trained(base, peft.LoraConfig(**peft_kwargs))
    if "modules_to_save" in peft_kwargs:
        with torch.no_grad():
            theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path / "peft")

    adapter = load_adapter(tmp_path / "peft")
    assert adapter.source_format == "peft" and adapter.alpha_known
    peft_layers = {n: m for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(adapter.modules) == set(peft_layers)
    for name, layer in peft_layers.items():
        module = adapter[name]
        assert (module.r, module.scale) == (layer.r["default"], layer.scaling["default"])
        assert torch.equal(module.delta_weight(), layer.get_delta_weight("default")), name

    ours = apply_adapter(pristine, adapter)
    torch.testing.assert_close(logits(ours, token_ids), logits(theirs, token_ids), rtol=1e-6, atol=1e-6)


def test_peft_rebuilds_per_module_rank_and_alpha_from_exact_patterns(tiny_bert, token_ids, tmp_path):
    """Ranks/α's no config pattern describes are written as exact-name patterns; PEFT follows them."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                        rank_pattern={r"layer\.0\.attention\.self\.value": 2, r"layer\.1\.attention\.self\.query": 6},
                        alpha_pattern={r"layer\.1\.attention\.self\.value": 5})
    ours = randomize_lora(inject_lora(copy.deepcopy(tiny_bert), config, seed=0))
    adapter = extract_adapter(ours)
    adapter.config = LoraConfig(r=7, lora_alpha=1, target_modules=["query", "value"])  # describes nothing
    save_adapter(adapter, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_bert, tmp_path / "adapter").eval()
    ranks = {n: (m.r["default"], m.scaling["default"]) for n, m in theirs.base_model.model.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ranks == {n: (m.r, m.scale) for n, m in adapter.items()}
    torch.testing.assert_close(logits(theirs, token_ids), logits(ours, token_ids), rtol=1e-6, atol=1e-6)


@pytest.mark.integration
def test_real_minilm_round_trip_through_peft(tmp_path):
    """Real MiniLM weights: ours → file → PEFT, and file → apply_adapter, give the same logits."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from lora_analysis.assets import asset_path

    path = asset_path("minilm")

    def fresh():  # a new random classifier head each time: the adapter must carry it
        return BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    batch = AutoTokenizer.from_pretrained(path)(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                        task_type="SEQ_CLS", base_model_name_or_path=str(path))
    ours = randomize_lora(inject_lora(fresh(), config), std=0.05)
    save_adapter(extract_adapter(ours), tmp_path / "minilm_lora")
    with torch.no_grad():
        expected = ours(**batch).logits
        theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "minilm_lora").eval()
        torch.testing.assert_close(theirs(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        applied = apply_adapter(fresh(), load_adapter(tmp_path / "minilm_lora"))
        torch.testing.assert_close(applied(**batch).logits, expected, rtol=0, atol=0)
