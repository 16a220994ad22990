"""`LoraLinear`: a frozen linear layer plus a low-rank update (Hu et al. 2021, Eq. 3).

    h = W0 x + b + s · B A dropout(x),    A: (r, d_in),  B: (d_out, r),  s = α/r (α/√r rsLoRA)

Wraps `nn.Linear` (W0: (d_out, d_in)) and transformers' GPT-2 `Conv1D` (W0 stored as
(d_in, d_out), "fan_in_fan_out"). A and B keep the Linear orientation in both cases; only ΔW
is transposed when it is added to a Conv1D weight.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import delta_weight
from ..base_weights import is_conv1d, linear_shape, weight_of
from ..config import lora_scale
from ..errors import LoraAnalysisError


def is_adaptable(module: nn.Module) -> bool:
    """Layers LoRA can wrap: `nn.Linear` and GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoraLinear(nn.Module):
    """A frozen `base` layer with a trainable LoRA path.

    Args:
        base: `nn.Linear` or `Conv1D` to wrap (kept as `self.base`, frozen).
        r: rank, ≥ 1.  alpha: α.  dropout: probability on the LoRA input.
        use_rslora: s = α/√r instead of α/r.
        init: "kaiming" (A Kaiming-uniform a=√5, the reference init) or "gaussian"
            (A ~ N(0, std=1/r), as PEFT's "gaussian"); B = 0 in both, so the layer starts as
            a no-op.
        generator: CPU generator for A's init; the same seed gives identical factors.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not is_adaptable(base):
            raise LoraAnalysisError(f"LoRA wraps nn.Linear or Conv1D, not {type(base).__name__}")
        if r < 1:
            raise LoraAnalysisError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.fan_in_fan_out = is_conv1d(base)
        self.d_out, self.d_in = linear_shape(base)
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Factors stay float32 whatever W0's dtype: they are what is trained and analysed.
        self.lora_A = nn.Parameter(torch.empty(self.r, self.d_in))
        self.lora_B = nn.Parameter(torch.empty(self.d_out, self.r))
        self.reset_lora_parameters(init, generator)
        self.to(weight_of(base).device)

    @property
    def scale(self) -> float:
        """s = α/r (α/√r with rsLoRA), `config.lora_scale`."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    def get_base_layer(self) -> nn.Module:
        """The wrapped pretrained layer (`base_weights.WrappedLayer`)."""
        return self.base

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        # Initialise on the CPU so a CPU generator gives the same factors on every device.
        a = torch.empty(self.r, self.d_in)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r, generator=generator)
        else:
            raise LoraAnalysisError(f"unknown LoRA init {init!r} (use 'kaiming' or 'gaussian')")
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in float32, in the base weight's storage orientation (`adapters.delta_weight`)."""
        return delta_weight(self.lora_A, self.lora_B, self.scale, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_A.dtype)
        # Scale the (…, r) intermediate, not the (…, d_out) output: r ≪ d_out elements to touch.
        lora = F.linear(F.linear(h, self.lora_A) * self.scale, self.lora_B)
        return out + lora.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW, computed in float32 and cast once. Refuses non-finite results."""
        if self.merged:
            raise LoraAnalysisError("LoRA layer is already merged")
        self._set_weight(weight_of(self.base).float() + self.delta_weight(), "merge")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW, undoing `merge`."""
        if not self.merged:
            raise LoraAnalysisError("LoRA layer is not merged")
        self._set_weight(weight_of(self.base).float() - self.delta_weight(), "unmerge")
        self.merged = False

    def _set_weight(self, new_weight: torch.Tensor, action: str) -> None:
        if not torch.isfinite(new_weight).all():
            raise LoraAnalysisError(f"{action} would produce non-finite weights; base weight left unchanged")
        weight = weight_of(self.base)
        weight.copy_(new_weight.to(weight.dtype))

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )
