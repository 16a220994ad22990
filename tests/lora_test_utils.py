"""Helpers shared by the LoRA core / adapter file tests."""

from __future__ import annotations

import torch
from torch import nn

from lora_analysis.lora import lora_layers


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Give every B (and A) random values, as after training, so ΔW ≠ 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * std)
    return model


def assert_adapters_identical(a, b) -> None:
    """Same modules, bit-identical factors (values and dtype), same r/α/rsLoRA/orientation, same extras."""
    assert list(a.modules) == list(b.modules)
    for name in a:
        ma, mb = a[name], b[name]
        assert ma.A.dtype == mb.A.dtype and ma.B.dtype == mb.B.dtype
        assert torch.equal(ma.A, mb.A) and torch.equal(ma.B, mb.B), name
        assert (ma.alpha, ma.use_rslora, ma.fan_in_fan_out) == (mb.alpha, mb.use_rslora, mb.fan_in_fan_out), name
    assert sorted(a.extra_tensors) == sorted(b.extra_tensors)
    for key, tensor in a.extra_tensors.items():
        assert tensor.dtype == b.extra_tensors[key].dtype and torch.equal(tensor, b.extra_tensors[key]), key
