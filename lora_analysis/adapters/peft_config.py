"""`adapter_config.json`: an `Adapter`'s per-module r/α as PEFT's config, and back.

PEFT gives module `m` the rank `rank_pattern[k]` for the first key `k` whose regex matches the
end of `m` at a dot boundary, else `r` (same for α with `alpha_pattern`/`lora_alpha`);
`LoraConfig.rank_for`/`alpha_for` follow the same rule. Writing keeps the config's own patterns
when they reproduce every module, else writes the most common value as the default plus one
exact-name pattern per module that differs, so PEFT rebuilds each module exactly.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable, TypeVar

from ..config import LoraConfig, pattern_value
from ..errors import AdapterFormatError, LoraAnalysisError, shown
from .adapter import Adapter
from .updates import LoraModule

V = TypeVar("V")


def peft_config_dict(adapter: Adapter) -> dict[str, Any]:
    """The adapter's `adapter_config.json` content (PEFT's LoraConfig fields, peft_type "LORA").

    `target_modules` lists the adapter's module paths exactly, so PEFT wraps those modules and
    no others. `base_model_name_or_path` is made portable (`portable_model_name`).
    Raises `LoraAnalysisError` for what PEFT cannot express: no modules, or rsLoRA on only
    some modules.
    """
    if not adapter.modules:
        raise LoraAnalysisError("cannot save an empty adapter (no LoRA modules)")
    rslora = {m.use_rslora for m in lora_modules(adapter).values()}
    if len(rslora) > 1:
        raise LoraAnalysisError("cannot save: rsLoRA is on for some modules only, PEFT's use_rslora is global")
    modules = lora_modules(adapter)
    config = adapter.config
    r, rank_pattern = default_and_pattern(config.r, config.rank_pattern, {name: m.r for name, m in modules.items()})
    # An unknown α is written as the one giving s = 1 and listed in the header, so that PEFT
    # uses the scale we report and reading it back says "unknown" again.
    alphas = {name: m.effective_alpha for name, m in modules.items()}
    alpha, alpha_pattern = default_and_pattern(config.lora_alpha, config.alpha_pattern, alphas)
    init = config.init_lora_weights
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": portable_model_name(config.base_model_name_or_path),
        "r": r,
        "lora_alpha": _json_number(alpha),
        "target_modules": list(adapter.modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _json_number(v) for k, v in alpha_pattern.items()},
        "lora_dropout": config.lora_dropout,
        "use_rslora": rslora.pop(),
        "init_lora_weights": True if init == "kaiming" else init,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in adapter.modules.values()),
        "bias": config.bias,
        "modules_to_save": config.modules_to_save,
        "inference_mode": True,
    }


def lora_modules(adapter: Adapter) -> dict[str, LoraModule]:
    """The adapter's modules, each a LoRA module (`LoraAnalysisError` otherwise)."""
    modules = {}
    for name, module in adapter.items():
        if not isinstance(module, LoraModule):
            raise LoraAnalysisError(f"cannot write module {shown(name)!r} as PEFT LoRA: it is a {module.kind} update")
        modules[name] = module
    return modules


def default_and_pattern(default: V | None, pattern: dict[str, V], values: dict[str, V]) -> tuple[V, dict[str, V]]:
    """(default, {regex: value}) giving `values[name]` for every module name under PEFT's rule.

    The given default and pattern when they already do; else the most common value and an
    exact-name pattern (`re.escape`d) for each module that differs.
    """
    if default is not None and all(pattern_value(pattern, n, default) == v for n, v in values.items()):
        return default, dict(pattern)
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(name): v for name, v in values.items() if v != common}


def portable_model_name(name: str | None) -> str | None:
    """A base-model name safe to write into a config: an absolute (or `~`) local path is reduced
    to its last component (`/data/models/minilm/` → `minilm`); hub ids and relative names
    are kept."""
    if name and (os.path.isabs(name) or name.startswith("~")):
        return PurePath(name).name
    return name


PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR")


@dataclass
class PeftSettings:
    """What a PEFT `adapter_config.json` (or a copy of it in a header) says, for the kinds read.

    config: r, α (`lora_alpha`; LoHa/LoKr call it `alpha`), rank/alpha patterns, rsLoRA,
    fan_in_fan_out, modules_to_save, ... as a `LoraConfig`. use_dora: LoRA with
    `lora_magnitude_vector`s. target_parameters: parameters (not modules) adapted, as
    `<module suffix>.<parameter>`. AdaLoRA: init_r (the rank PEFT builds each layer with, which
    sets its scale α / (init_r + 1e-5)) and rank_masks ({module: kept-rank mask}, its
    `rank_pattern`).
    """

    peft_type: str
    config: LoraConfig
    use_dora: bool = False
    target_parameters: list[str] = field(default_factory=list)
    init_r: int | None = None
    rank_masks: dict[str, list[bool]] = field(default_factory=dict)


def config_from_peft_dict(data: Any, path: str | os.PathLike) -> LoraConfig:
    """The `LoraConfig` of a PEFT/our `adapter_config.json` dict (see `peft_settings`)."""
    return peft_settings(data, path).config


def peft_settings(data: Any, path: str | os.PathLike) -> PeftSettings:
    """Validate a PEFT/our `adapter_config.json` dict and read what the readers need from it.

    Raises `AdapterFormatError(path, ...)` for a peft_type we do not read or a field of the
    wrong type; fields we do not model are ignored.
    """
    if not isinstance(data, dict):
        raise AdapterFormatError(path, f"adapter config is a {type(data).__name__}, expected a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type not in PEFT_TYPES:
        raise AdapterFormatError(path, f"peft_type is {shown(peft_type)!r}, which is not read: only LORA, ADALORA, "
                                       "LOHA and LOKR adapters are")

    def check(field: str, ok: bool, expected: str) -> None:
        if field in data and not ok:
            raise AdapterFormatError(path, f"adapter config field {field!r} is {shown(data[field], 60)}, expected {expected}")

    def is_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def is_pattern(x: Any, value: Callable[[Any], bool] = is_number) -> bool:
        return isinstance(x, dict) and all(isinstance(k, str) and value(v) for k, v in x.items())

    def is_names(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(n, str) for n in x)

    def is_mask(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(b, bool) for b in x)

    alpha_field = "alpha" if peft_type in ("LOHA", "LOKR") else "lora_alpha"
    r, alpha, ranks = data.get("r"), data.get(alpha_field), data.get("rank_pattern")
    check("r", isinstance(r, int) and not isinstance(r, bool) and r >= 1, "a positive integer")
    check(alpha_field, alpha is None or is_number(alpha), "a number")
    if peft_type == "ADALORA":
        check("init_r", isinstance(data.get("init_r"), int) and not isinstance(data.get("init_r"), bool)
              and data.get("init_r", 0) >= 1, "a positive integer")
        check("rank_pattern", ranks is None or is_pattern(ranks, is_mask), "{module.lora_E: [true/false, ...]}")
    else:
        check("rank_pattern", ranks is None or (is_pattern(ranks) and all(_is_rank(v) for v in ranks.values())),
              "{regex: positive integer}")
    check("alpha_pattern", data.get("alpha_pattern") is None or is_pattern(data.get("alpha_pattern")),
          "{regex: number}")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "use_effective_conv2d"):
        check(flag, isinstance(data.get(flag), bool) or data.get(flag) is None, "true or false")
    targets = data.get("target_modules")
    check("target_modules", targets is None or isinstance(targets, str) or is_names(targets), "a list or a regex")
    check("target_parameters", data.get("target_parameters") is None or is_names(data.get("target_parameters")),
          "a list of parameter names")
    check("modules_to_save", data.get("modules_to_save") is None or is_names(data.get("modules_to_save")),
          "a list of names")
    fields = dict(data)
    for key in ("rank_pattern", "alpha_pattern"):
        if fields.get(key) is None or (key == "rank_pattern" and peft_type == "ADALORA"):
            fields.pop(key, None)
    init = fields.get("init_lora_weights", "kaiming")
    fields["init_lora_weights"] = "kaiming" if init is True else str(init)
    fields["lora_alpha"] = float(alpha) if isinstance(alpha, (int, float)) else None
    for flag in ("use_rslora", "fan_in_fan_out"):
        fields[flag] = bool(fields.get(flag))
    return PeftSettings(
        peft_type=peft_type,
        config=LoraConfig.from_dict(fields),
        use_dora=bool(data.get("use_dora")),
        target_parameters=list(data.get("target_parameters") or []),
        init_r=data.get("init_r") if peft_type == "ADALORA" else None,
        rank_masks=dict(ranks or {}) if peft_type == "ADALORA" else {},
    )


def _is_rank(x: Any) -> bool:
    return isinstance(x, int) and x >= 1


def _json_number(x: float | None) -> float | int | None:
    """16.0 → 16 (as PEFT writes α); other values unchanged."""
    return int(x) if isinstance(x, float) and x.is_integer() else x
