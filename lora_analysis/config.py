"""`LoraConfig`: one recipe for injecting LoRA and for describing a saved adapter, the scale
rule s = α/r, and the vocabulary of settings shared by the API and the command line.

Field names follow PEFT's `LoraConfig` so `adapter_config.json` maps onto it one to one.
Nothing here imports torch: the command line builds its parser from these names.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ALL_LINEAR = "all-linear"

BasisKind = Literal["A", "B", "dW-left", "dW-right"]
# The bases φ compares (paper Eq. 4 and its footnote), with what each one is.
BASIS_DESCRIPTIONS: dict[BasisKind, str] = {
    "A": "right-singular vectors of A (input space)",
    "B": "left-singular vectors of B (output space)",
    "dW-left": "left-singular vectors of ΔW (output space)",
    "dW-right": "right-singular vectors of ΔW (input space)",
}
BASIS_KINDS: tuple[BasisKind, ...] = tuple(BASIS_DESCRIPTIONS)

T = TypeVar("T", bound="DataclassInstance")


def scale_divisor(r: int, use_rslora: bool) -> float:
    """The divisor of α in the LoRA scale: r, or √r with rsLoRA (Kalajdzievski 2023)."""
    return math.sqrt(r) if use_rslora else float(r)


def lora_scale(alpha: float | None, r: int, use_rslora: bool) -> float:
    """s = α/r (α/√r with rsLoRA); 1.0 when α is unknown (None)."""
    return 1.0 if alpha is None else alpha / scale_divisor(r, use_rslora)


def effective_alpha(alpha: float | None, r: int, use_rslora: bool) -> float:
    """α, or when it is unknown the α that gives the scale 1.0 used instead (r, or √r)."""
    return scale_divisor(r, use_rslora) if alpha is None else alpha


@dataclass
class LoraConfig:
    """LoRA hyper-parameters.

    target_modules: list of module-name suffixes (["query", "value"] matches
        `...attention.self.query`), a regex matched against the full module name, or
        "all-linear" (every Linear/Conv1D but the output head and `modules_to_save`).
    rank_pattern / alpha_pattern: {regex: value}; a key matches a module whose name ends with
        it at a dot boundary (PEFT's rule), and overrides `r` / `lora_alpha` there.
    lora_alpha: α; None only for adapters read from files that do not record it.
    """

    r: int = 8
    lora_alpha: float | None = 8.0
    target_modules: list[str] | str | None = field(default_factory=lambda: ["query", "value"])
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str = "kaiming"
    fan_in_fan_out: bool = False
    bias: str = "none"  # "none" | "all" | "lora_only"
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float | None:
        value = pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from a PEFT/our config dict, ignoring fields we do not model."""
        return from_known_fields(cls, data)


def from_known_fields(cls: type[T], data: dict[str, Any]) -> T:
    """`cls(**data)` for a dataclass, dropping keys that are not its fields (newer or foreign
    configs carry more than we model)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Value of the first pattern whose regex matches the end of `module_name` at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default


def matches_suffix(module_name: str, suffixes: list[str] | tuple[str, ...]) -> bool:
    """True when `module_name` is one of `suffixes` or ends with `.suffix`."""
    return any(module_name == s or module_name.endswith("." + s) for s in suffixes)
