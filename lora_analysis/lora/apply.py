"""Load an `Adapter` into a model: LoRA layers at exactly its modules, holding its factors."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from ..adapters import Adapter, LoraModule
from ..base_weights import linear_shape
from ..errors import LoraAnalysisError, ModuleResolutionError
from ..naming import resolve_module_name
from .inject import extra_parameters, mark_trainable, replace_module, set_lora_config, unwrapped_parameter_name
from .layer import LoraLinear, is_adaptable


def apply_adapter(model: nn.Module, adapter: Adapter, strict: bool = True) -> nn.Module:
    """Put `adapter` into `model` in place and return it.

    Each adapter module gets a `LoraLinear` with its r, α (unknown α: s = 1, as the Adapter
    reports) and rsLoRA, holding its A (r, d_in) and B (d_out, r); extra tensors
    (modules_to_save, biases) are copied into the model's parameters. Names are matched with
    `resolve_module_name`, so `base_model.model.`/`bert.` prefixes may differ between adapter
    and model. The layer type decides the orientation of ΔW (Conv1D: transposed).

    strict: a name that matches nothing raises `ModuleResolutionError`; with strict=False it
    is skipped with a warning naming it. Wrong layer type or shape always raises
    `LoraAnalysisError`, before the model is changed. Afterwards the model is trainable as after
    `inject_lora` (factors, modules_to_save, biases per config), config in `model.lora_config`.
    """
    module_names = [name for name, _ in model.named_modules() if name]
    parameters = {unwrapped_parameter_name(model, n): p for n, p in model.named_parameters()}
    skipped: list[str] = []
    targets = _resolve(list(adapter.modules), module_names, "model", strict, skipped)
    params = _resolve(list(adapter.extra_tensors), list(parameters), "model's parameters", strict, skipped)
    if skipped:
        message = f"apply_adapter skipped {len(skipped)} name(s) matching nothing in the model: {skipped}"
        warnings.warn(message, stacklevel=2)
    if len(set(targets.values())) < len(targets):
        raise LoraAnalysisError(f"several adapter modules name the same model module: {sorted(targets)}")
    modules = {name: _lora_module(adapter, name) for name in targets}
    for name, target in targets.items():
        _check_target(model.get_submodule(target), name, target, modules[name].d_out, modules[name].d_in)
    for name, target in params.items():
        if parameters[target].shape != adapter.extra_tensors[name].shape:
            raise LoraAnalysisError(
                f"extra tensor {name!r} has shape {tuple(adapter.extra_tensors[name].shape)}, "
                f"the model's {target!r} has {tuple(parameters[target].shape)}"
            )

    config = replace(adapter.config, target_modules=list(targets.values()))
    extra_parameters(model, config)  # raises now, not half-way, if modules_to_save or bias do not fit

    with torch.no_grad():
        for name, target in targets.items():
            module = modules[name]
            layer = LoraLinear(
                model.get_submodule(target), r=module.r, alpha=module.effective_alpha,
                dropout=adapter.config.lora_dropout, use_rslora=module.use_rslora,
            )
            layer.lora_A.copy_(module.A)
            layer.lora_B.copy_(module.B)
            replace_module(model, target, layer)
        for name, target in params.items():
            parameters[target].copy_(adapter.extra_tensors[name])
    set_lora_config(model, config)
    mark_trainable(model, config)
    return model


def _lora_module(adapter: Adapter, name: str) -> LoraModule:
    """The adapter's module `name`, which must be LoRA on a Linear/Conv1D (the layers we build)."""
    module = adapter[name]
    if type(module) is not LoraModule or module.parts != 1 or module.kernel is not None or module.bias is not None:
        raise LoraAnalysisError(f"apply_adapter puts LoRA (s·B·A on Linear/Conv1D layers) into a model; module {name!r} "
                                f"is a {module.kind} update of another form")
    return module


def _resolve(names: list[str], candidates: list[str], what: str, strict: bool, skipped: list[str]) -> dict[str, str]:
    resolved = {}
    for name in names:
        try:
            resolved[name] = resolve_module_name(name, candidates, what)
        except ModuleResolutionError:
            if strict:
                raise
            skipped.append(name)
    return resolved


def _check_target(module: nn.Module, name: str, target: str, d_out: int, d_in: int) -> None:
    if isinstance(module, LoraLinear):
        raise LoraAnalysisError(f"module {target!r} already has a LoRA layer (remove_lora first)")
    if not is_adaptable(module):
        kind = type(module).__name__
        raise LoraAnalysisError(f"adapter module {name!r} is {target!r} in the model, a {kind}, not Linear/Conv1D")
    if linear_shape(module) != (d_out, d_in):
        raise LoraAnalysisError(
            f"shape mismatch at {target!r}: the adapter's ΔW is (d_out, d_in) = {(d_out, d_in)}, "
            f"the model's layer is {linear_shape(module)}"
        )
