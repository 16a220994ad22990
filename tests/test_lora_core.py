"""The LoRA core: injection, init, scaling, merge/unmerge, removal, trainable parameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lora_analysis import LoraAnalysisError, LoraConfig, LoraLinear, extract_adapter, inject_lora
from lora_analysis.lora import (
    find_target_modules,
    lora_layers,
    merge_lora,
    named_lora_layers,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from lora_test_utils import randomize_lora

QV = ["query", "value"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_noop_at_init(tiny_bert, tiny_gpt2, token_ids):
    for base, targets, count in ((tiny_bert, QV, 4), (tiny_gpt2, ["c_attn"], 2)):
        before = logits(base, token_ids)
        model = inject_lora(base, LoraConfig(r=4, target_modules=targets), seed=0)
        assert len(list(lora_layers(model))) == count
        assert torch.equal(logits(model, token_ids), before)


@pytest.mark.parametrize("fixture,targets", [("tiny_bert", QV), ("tiny_gpt2", ["c_attn", "c_proj"])])
def test_merged_equals_unmerged_and_unmerge_restores(request, fixture, targets, token_ids):
    model = inject_lora(request.getfixturevalue(fixture), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model)
    weights = {n: layer.base.weight.clone() for n, layer in named_lora_layers(model)}
    unmerged = logits(model, token_ids)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model))
    torch.testing.assert_close(logits(model, token_ids), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, layer in named_lora_layers(model):
        torch.testing.assert_close(layer.base.weight, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, token_ids), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_twice_and_unmerge_unmerged_are_errors(tiny_bert):
    layer = next(lora_layers(inject_lora(tiny_bert, LoraConfig(r=2))))
    with pytest.raises(LoraAnalysisError):
        layer.unmerge()
    layer.merge()
    with pytest.raises(LoraAnalysisError):
        layer.merge()


def test_only_lora_and_modules_to_save_train(tiny_bert):
    model = inject_lora(tiny_bert, LoraConfig(r=4, target_modules=QV, modules_to_save=["classifier"]))
    expected = {f"{n}.lora_{p}" for n, _ in named_lora_layers(model) for p in "AB"}
    expected |= {"classifier.weight", "classifier.bias"}
    assert set(trainable_parameters(model)) == expected


def test_bias_lora_only_trains_and_extracts_wrapped_biases(tiny_bert):
    model = inject_lora(tiny_bert, LoraConfig(r=2, target_modules=QV, bias="lora_only"))
    trained_biases = {n for n in trainable_parameters(model) if n.endswith("bias")}
    assert trained_biases == {f"{n}.base.bias" for n, _ in named_lora_layers(model)}
    model.requires_grad_(False)  # extraction is structural, not by requires_grad
    assert set(extract_adapter(model).extra_tensors) == {f"{n}.bias" for n, _ in named_lora_layers(model)}


@pytest.mark.parametrize("r", [1, 4, 8])
def test_trainable_count_is_2Ldr(tiny_bert, r):
    model = inject_lora(tiny_bert, LoraConfig(r=r, target_modules=QV))
    L, d = 2 * 2, 32  # 2 layers × {query, value}, hidden 32
    assert sum(p.numel() for p in trainable_parameters(model).values()) == 2 * L * d * r
    assert extract_adapter(model).num_parameters() == 2 * L * d * r


def test_targets_by_suffix_regex_and_all_linear(tiny_bert, tiny_gpt2):
    suffix = find_target_modules(tiny_bert, LoraConfig(target_modules=["value"]))
    assert suffix == [f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)]
    regex = find_target_modules(tiny_bert, LoraConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert regex == [f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "key")]
    every = find_target_modules(tiny_bert, LoraConfig(target_modules="all-linear"))
    linears = [n for n, m in tiny_bert.named_modules() if isinstance(m, nn.Linear)]
    assert every == [n for n in linears if n != "classifier"]
    gpt2 = find_target_modules(tiny_gpt2, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in gpt2 and len(gpt2) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    with pytest.raises(LoraAnalysisError, match="matches no"):
        find_target_modules(tiny_bert, LoraConfig(target_modules=["nonexistent"]))


def test_rank_and_alpha_patterns(tiny_bert):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=QV, rank_pattern={"value": 2},
                        alpha_pattern={r"layer\.1\.attention\.self\.query": 3})
    layers = dict(named_lora_layers(inject_lora(tiny_bert, config)))
    prefix = "bert.encoder.layer"
    assert {n: (l.r, l.alpha) for n, l in layers.items()} == {
        f"{prefix}.0.attention.self.query": (8, 16.0),
        f"{prefix}.0.attention.self.value": (2, 16.0),
        f"{prefix}.1.attention.self.query": (8, 3.0),
        f"{prefix}.1.attention.self.value": (2, 16.0),
    }


def test_seeded_init_is_reproducible(tiny_bert):
    def factors(seed):
        model = inject_lora(copy.deepcopy(tiny_bert), LoraConfig(r=4), seed=seed)
        return [layer.lora_A.clone() for layer in lora_layers(model)]

    first, again, other = factors(3), factors(3), factors(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # layers draw different values


def test_kaiming_and_gaussian_init_statistics():
    torch.manual_seed(0)
    d_in, r = 600, 8
    kaiming = LoraLinear(nn.Linear(d_in, 300), r=r, alpha=8, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=√5) on fan_in = d_in
    assert kaiming.lora_A.abs().max() <= bound and kaiming.lora_A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(kaiming.lora_B) == 0
    gaussian = LoraLinear(nn.Linear(d_in, 300), r=r, alpha=8, init="gaussian", generator=torch.Generator().manual_seed(0))
    assert gaussian.lora_A.std().item() == pytest.approx(1 / r, rel=0.03)
    assert gaussian.lora_A.mean().abs().item() < 0.1 / r  # ~7 standard errors
    assert torch.count_nonzero(gaussian.lora_B) == 0


def test_scale_plain_and_rslora():
    plain = LoraLinear(nn.Linear(16, 16), r=4, alpha=8)
    rs = LoraLinear(nn.Linear(16, 16), r=4, alpha=8, use_rslora=True)
    assert plain.scale == 2.0 and rs.scale == 4.0
    torch.nn.init.normal_(rs.lora_B)
    x = torch.randn(5, 16)
    manual = rs.base(x) + 8 / math.sqrt(4) * x @ rs.lora_A.T @ rs.lora_B.T
    torch.testing.assert_close(rs(x), manual)


def test_conv1d_delta_is_transposed(tiny_gpt2, token_ids):
    conv = tiny_gpt2.transformer.h[0].attn.c_attn  # Conv1D: weight (d_in=32, d_out=96)
    W0, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    inject_lora(tiny_gpt2, LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn"]))
    randomize_lora(tiny_gpt2)
    layer = tiny_gpt2.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)
    manual_delta = 3.0 * (layer.lora_B @ layer.lora_A)  # (d_out, d_in), Linear orientation
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), x @ W0 + bias + x @ manual_delta.T, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, W0 + manual_delta.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(extract_adapter(tiny_gpt2)[
        "transformer.h.0.attn.c_attn"].delta_weight(), manual_delta.T, rtol=0, atol=1e-6)


def test_merge_refuses_non_finite_and_leaves_weight(tiny_bert):
    layer = next(lora_layers(inject_lora(tiny_bert, LoraConfig(r=2))))
    before = layer.base.weight.clone()
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
        layer.lora_A[0, 0] = float("inf")
    with pytest.raises(LoraAnalysisError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, before)


@pytest.mark.parametrize("merge", [True, False])
def test_remove_lora(tiny_bert, token_ids, merge):
    base_out = logits(tiny_bert, token_ids)
    model = randomize_lora(inject_lora(tiny_bert, LoraConfig(r=4, target_modules=QV)))
    lora_out = logits(model, token_ids)
    assert not torch.allclose(lora_out, base_out)
    if not merge:
        merge_lora(model)  # remove_lora(merge=False) must unmerge first
    remove_lora(model, merge=merge)
    assert not any(isinstance(m, LoraLinear) for m in model.modules()) and not hasattr(model, "lora_config")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, nn.Linear)
    torch.testing.assert_close(logits(model, token_ids), lora_out if merge else base_out, rtol=1e-5, atol=1e-5)


def test_bf16_merge_casts_once():
    base = nn.Linear(24, 16).to(torch.bfloat16)
    W0 = base.weight.detach().clone()
    layer = LoraLinear(base, r=4, alpha=4)
    torch.nn.init.normal_(layer.lora_B)
    assert layer.lora_A.dtype == torch.float32
    expected = (W0.float() + layer.lora_B @ layer.lora_A).to(torch.bfloat16)
    layer.merge()
    assert base.weight.dtype == torch.bfloat16 and torch.equal(base.weight, expected)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_extract_adapter_copies_config(tiny_gpt2):
    config = LoraConfig(r=2, target_modules=["c_attn"])
    adapter = extract_adapter(inject_lora(tiny_gpt2, config))
    assert adapter.config.fan_in_fan_out and not config.fan_in_fan_out
    assert all(m.fan_in_fan_out for m in adapter.modules.values())


def test_ranks_start_from_independent_subspaces(tiny_bert):
    """r = 8 and r = 64 adapters of one seed must not share A's init, or φ(A_8, A_64) would
    measure the shared random stream instead of what training learned."""
    import copy

    from lora_analysis import LoraConfig, inject_lora

    def first_A(r):
        model = inject_lora(copy.deepcopy(tiny_bert), LoraConfig(r=r, target_modules=["query"]), seed=0)
        return model.bert.encoder.layer[0].attention.self.query.lora_A.detach().double()

    A4, A16 = first_A(4), first_A(16)
    assert not torch.equal(A4, A16[:4])
    # φ(4, 16) of the row spaces: chance E = 16/d = 0.5 (d = 32); a shared stream gives 1
    Q4, Q16 = torch.linalg.qr(A4.T).Q, torch.linalg.qr(A16.T).Q
    assert float((Q4.T @ Q16).pow(2).sum() / 4) < 0.9


def test_injecting_twice_is_refused_and_the_model_left_as_it_was(tiny_bert, token_ids):
    """A second inject_lora would wrap LoRA in LoRA (regex or all-linear targets reach the
    `.base` layers) and hide the first config; merge_lora then failed with AttributeError."""
    model = randomize_lora(inject_lora(tiny_bert, LoraConfig(r=4, target_modules=QV), seed=0))
    before, config = logits(model, token_ids), model.lora_config
    for targets in (QV, "all-linear", r".*query.*"):
        with pytest.raises(LoraAnalysisError, match=r"already has 4 LoRA layer\(s\).*remove_lora first"):
            inject_lora(model, LoraConfig(r=2, target_modules=targets), seed=1)
    assert model.lora_config is config and len(list(lora_layers(model))) == 4
    assert not any(isinstance(layer.base, LoraLinear) for layer in lora_layers(model))
    assert torch.equal(logits(model, token_ids), before)
    merge_lora(model)  # still works
    inject_lora(remove_lora(model), LoraConfig(r=2, target_modules=QV), seed=1)  # after remove_lora: fine


def test_unknown_alpha_gives_scale_one_with_and_without_rslora(tiny_bert):
    for rslora in (False, True):
        model = inject_lora(copy.deepcopy(tiny_bert), LoraConfig(r=4, lora_alpha=None, use_rslora=rslora), seed=0)
        assert {layer.scale for layer in lora_layers(model)} == {1.0}, rslora
        assert {m.scale for m in extract_adapter(model).modules.values()} == {1.0}


def test_layer_and_adapter_share_one_scale_and_delta_weight(tiny_gpt2):
    """`LoraLinear` and `LoraModule` compute s and ΔW by the same rule (config.lora_scale,
    adapters.delta_weight): equal to the bit, Conv1D orientation included."""
    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["c_attn"])
    model = randomize_lora(inject_lora(tiny_gpt2, config, seed=0))
    adapter = extract_adapter(model)
    for name, layer in named_lora_layers(model):
        assert layer.scale == adapter[name].scale == 6 / 2
        assert torch.equal(layer.delta_weight(), adapter[name].delta_weight())
        assert layer.delta_weight().shape == (32, 96)  # Conv1D stores (d_in, d_out)
