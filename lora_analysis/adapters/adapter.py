"""The `Adapter` data model: LoRA factors per module, independent of any model or file layout.

Per module (paper notation, Hu et al. 2021, arXiv 2106.09685)::

    h = W0 x + s · B A x,     A: (r, d_in),  B: (d_out, r),  ΔW = s · B A: (d_out, d_in)
    s = α / r   (or α / √r with rsLoRA)

A and B always keep the `nn.Linear` orientation. For GPT-2's `Conv1D` (`fan_in_fan_out`), the
base weight is stored as (d_in, d_out) and only ΔW is transposed to match it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import ItemsView, Iterator

import torch

from ..config import LoraConfig, effective_alpha, lora_scale


def delta_weight(
    A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Materialized ΔW = s·B·A in `dtype`: A: (r, d_in), B: (d_out, r) → (d_out, d_in), or its
    transpose (d_in, d_out), the base weight's storage orientation, for fan_in_fan_out."""
    delta = scale * (B.to(dtype) @ A.to(dtype))
    return delta.T if fan_in_fan_out else delta


@dataclass
class LoraModule:
    """LoRA factors of one module.

    A: (r, d_in), B: (d_out, r). `alpha` is None when no file or config gave it; `scale` then
    falls back to 1.0, and `alpha_known` is False so reports can say "unknown".
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float | None
    use_rslora: bool = False
    fan_in_fan_out: bool = False

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def alpha_known(self) -> bool:
        return self.alpha is not None

    @property
    def scale(self) -> float:
        """s = α/r (α/√r with rsLoRA); 1.0 when α is unknown (`config.lora_scale`)."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    @property
    def effective_alpha(self) -> float:
        """α, or when it is unknown the α giving the s = 1.0 used instead (r, or √r with rsLoRA)."""
        return effective_alpha(self.alpha, self.r, self.use_rslora)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Materialized ΔW = s·B·A, (d_out, d_in), or (d_in, d_out) for fan_in_fan_out.

        For tests and small modules only: the analyses work on the factors.
        """
        return delta_weight(self.A, self.B, self.scale, self.fan_in_fan_out, dtype)


@dataclass
class Adapter:
    """A LoRA adapter: factors per module path, extra trained tensors, and its config.

    `modules` is keyed by the module path inside the base model as the adapter names it, without
    PEFT's `base_model.model.` prefix (e.g. `bert.encoder.layer.0.attention.self.query`).
    `extra_tensors` holds `modules_to_save` (and trained bias) tensors keyed by parameter name.
    """

    modules: dict[str, LoraModule]
    config: LoraConfig = field(default_factory=LoraConfig)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None
    source_format: str | None = None

    def __post_init__(self) -> None:
        unknown = [name for name, m in self.modules.items() if not m.alpha_known]
        if unknown:
            where = f" in {self.source}" if self.source else ""
            warnings.warn(
                f"LoRA alpha unknown for {len(unknown)} module(s){where} (e.g. {unknown[0]}): "
                "scale s = alpha/r is reported as unknown and 1.0 is used for ΔW",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> LoraModule:
        return self.modules[name]

    def items(self) -> ItemsView[str, LoraModule]:
        return self.modules.items()

    @property
    def alpha_known(self) -> bool:
        return all(m.alpha_known for m in self.modules.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.r for name, m in self.modules.items()}

    def num_parameters(self) -> int:
        """Trainable LoRA parameters: Σ r·(d_in + d_out)."""
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def select(self, names: list[str]) -> "Adapter":
        """A view restricted to `names` (same tensors, no copy, no repeated warning)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return replace(self, modules={n: self.modules[n] for n in names})
