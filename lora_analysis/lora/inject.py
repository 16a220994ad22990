"""Inject LoRA into a model, freeze the rest, merge/unmerge, remove, and read the factors out.

    model = inject_lora(model, LoraConfig(r=8, target_modules=["query", "value"]), seed=0)
    ...train...
    adapter = extract_adapter(model)       # -> Adapter (factors + modules_to_save tensors)
    merge_lora(model); unmerge_lora(model); remove_lora(model, merge=True)

Modules and parameters are selected structurally (module types, module identity), never by a
substring of a parameter name. Trainable-parameter count is Σ r·(d_in + d_out), i.e.
|Θ| = 2·L·d·r for L square d×d projections (paper Sec. 4.2).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable, Iterator

from torch import nn

from ..adapters import Adapter, LoraModule
from ..config import ALL_LINEAR, LoraConfig, effective_alpha, matches_suffix
from ..errors import LoraAnalysisError
from ..seeding import seeded_generator
from .layer import LoraLinear, is_adaptable

# Attribute under which a model keeps the config its LoRA layers were made with.
CONFIG_ATTRIBUTE = "lora_config"


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the Linear/Conv1D modules that `config.target_modules` selects, in model order."""
    targets = config.target_modules
    if targets is None:
        raise LoraAnalysisError("target_modules is not set")
    excluded = _excluded_from_all_linear(model, config) if targets == ALL_LINEAR else set()
    names = []
    for name, module in model.named_modules():
        if not name or not is_adaptable(module) or isinstance(module, LoraLinear):
            continue
        if targets == ALL_LINEAR:
            selected = not any(name == e or name.startswith(e + ".") for e in excluded)
        elif isinstance(targets, str):
            selected = re.fullmatch(targets, name) is not None
        else:
            selected = matches_suffix(name, list(targets))
        if selected:
            names.append(name)
    if not names:
        raise LoraAnalysisError(f"target_modules {targets!r} matches no Linear/Conv1D module of the model")
    return names


# Attribute names of classification heads on Hugging Face models (PEFT's SEQ_CLS_HEAD_NAMES).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


def _excluded_from_all_linear(model: nn.Module, config: LoraConfig) -> set[str]:
    """Subtrees "all-linear" leaves alone, as PEFT does: the output head (`lm_head`), a
    classification head (`classifier`/`score`) and the `modules_to_save`."""
    excluded = {name for name, _ in model.named_modules() if name and matches_suffix(name, config.modules_to_save or [])}
    get_head = getattr(model, "get_output_embeddings", None)
    heads = [get_head() if callable(get_head) else None]
    heads += [getattr(model, attr, None) for attr in CLASSIFIER_HEAD_NAMES]
    heads = [h for h in heads if isinstance(h, nn.Module)]
    excluded |= {name for name, module in model.named_modules() if name and any(module is h for h in heads)}
    return excluded


def inject_lora(model: nn.Module, config: LoraConfig, seed: int | None = 0) -> nn.Module:
    """Replace the target layers of `model` (in place) by `LoraLinear` and freeze the rest.

    Trainable afterwards: every lora_A/lora_B, the parameters of `config.modules_to_save`
    modules, and biases per `config.bias` ("all", or "lora_only" for the wrapped layers).
    Each layer's A is drawn from its own CPU generator seeded by (seed, module name, r): the
    same seed gives identical factors, and adapters of different ranks start from independent
    subspaces (one shared stream would make A_{r=8} the first rows of A_{r=64} in the first
    layer, and φ between them would measure the shared init). The config is kept as
    `model.lora_config`.

    A model that already has LoRA layers is refused (`remove_lora` first): wrapping a LoRA
    layer's base again would nest LoRA in LoRA, and the new config would hide the old one.
    """
    existing = [name for name, _ in named_lora_layers(model)]
    if existing:
        raise LoraAnalysisError(
            f"the model already has {len(existing)} LoRA layer(s) (e.g. {existing[0]!r}): "
            "call remove_lora first, or apply_adapter to load saved factors"
        )
    for name in find_target_modules(model, config):
        base = model.get_submodule(name)
        r, alpha = config.rank_for(name), config.alpha_for(name)
        layer = LoraLinear(
            base,
            r=r,
            alpha=effective_alpha(alpha, r, config.use_rslora),  # α unset: s = 1
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init=config.init_lora_weights,
            generator=None if seed is None else seeded_generator(seed, name, r),
        )
        replace_module(model, name, layer)
    set_lora_config(model, config)
    mark_trainable(model, config)
    return model


def set_lora_config(model: nn.Module, config: LoraConfig) -> None:
    """Keep `config` on the model (`model.lora_config`), where `extract_adapter` finds it."""
    setattr(model, CONFIG_ATTRIBUTE, config)


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The config kept by `inject_lora` / `apply_adapter`, or None."""
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    return config if isinstance(config, LoraConfig) else None


def mark_trainable(model: nn.Module, config: LoraConfig) -> None:
    """Freeze everything, then unfreeze LoRA factors, modules_to_save and the chosen biases."""
    extra = extra_parameters(model, config)
    model.requires_grad_(False)
    for layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for param in extra.values():
        param.requires_grad_(True)


def extra_parameters(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """What trains besides the factors: parameters of `config.modules_to_save` modules and, per
    `config.bias`, biases ("all": every module's, "lora_only": the wrapped layers'). Keyed by
    the parameter's name in the model without LoRA (`...query.bias`, not `...query.base.bias`)."""
    chosen = [p for module in _modules_to_save(model, config).values() for p in module.parameters()]
    biases: Iterable[object]
    if config.bias == "all":
        biases = (getattr(m, "bias", None) for m in model.modules())
    elif config.bias == "lora_only":
        biases = (layer.base.bias for layer in lora_layers(model))
    elif config.bias == "none":
        biases = ()
    else:
        raise LoraAnalysisError(f"bias must be 'none', 'all' or 'lora_only', got {config.bias!r}")
    chosen += [b for b in biases if isinstance(b, nn.Parameter)]
    chosen_ids = {id(p) for p in chosen}
    return {
        unwrapped_parameter_name(model, name): p for name, p in model.named_parameters() if id(p) in chosen_ids
    }


def _modules_to_save(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    wanted = config.modules_to_save or []
    found = {name: m for name, m in model.named_modules() if name and matches_suffix(name, wanted)}
    missing = [w for w in wanted if not any(matches_suffix(n, [w]) for n in found)]
    if missing:
        raise LoraAnalysisError(f"modules_to_save {missing} match no module of the model")
    return found


def lora_layers(model: nn.Module) -> Iterator[LoraLinear]:
    return (m for m in model.modules() if isinstance(m, LoraLinear))


def named_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def merge_lora(model: nn.Module) -> None:
    """Fold ΔW into every LoRA layer's base weight (explicit; never implied by train/eval)."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back: with ΔW folded in (`merge=True`) or without it."""
    for name, layer in list(named_lora_layers(model)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base)
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model


def extract_adapter(model: nn.Module, config: LoraConfig | None = None) -> Adapter:
    """The model's LoRA factors and trained extra tensors as an `Adapter` (detached CPU copies).

    Module names are the model's own (e.g. `bert.encoder.layer.0.attention.self.query`).
    Extra tensors: `extra_parameters(model, config)` (modules_to_save, biases per `config.bias`).
    The returned config is a copy; the model's is left as it was.
    """
    config = config or lora_config_of(model)
    if config is None:
        raise LoraAnalysisError("model has no LoRA config: call inject_lora first or pass config")
    modules = {
        name: LoraModule(
            A=layer.lora_A.detach().cpu().clone(),
            B=layer.lora_B.detach().cpu().clone(),
            alpha=layer.alpha,
            use_rslora=layer.use_rslora,
            fan_in_fan_out=layer.fan_in_fan_out,
        )
        for name, layer in named_lora_layers(model)
    }
    extra = {name: p.detach().cpu().clone() for name, p in extra_parameters(model, config).items()}
    config = replace(config, fan_in_fan_out=any(m.fan_in_fan_out for m in modules.values()))
    return Adapter(modules=modules, config=config, extra_tensors=extra, source_format="ours")


def unwrapped_parameter_name(model: nn.Module, name: str) -> str:
    """`...query.base.bias` → `...query.bias`: a parameter's name in the model without LoRA."""
    module_name, _, param = name.rpartition(".")
    owner_name, _, last = module_name.rpartition(".")
    if last == "base" and isinstance(model.get_submodule(owner_name) if owner_name else model, LoraLinear):
        return f"{owner_name}.{param}" if owner_name else param
    return name


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
