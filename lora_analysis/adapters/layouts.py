"""Key layouts of LoRA state dicts: which tensor is A or B of which module, and checks on them.

    PEFT     base_model.model.<module>.lora_A.weight (r, d_in)   .lora_B.weight (d_out, r)
             other keys: base_model.model.<param name> (modules_to_save, biases)
    kohya    <name>.lora_down.weight = A   <name>.lora_up.weight = B   <name>.alpha (0-dim)
    loralib  <module>.lora_A = A           <module>.lora_B = B         other keys: extra tensors
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import AdapterFormatError, shown

PEFT_PREFIX = "base_model.model."

# layout -> (suffix of A, suffix of B)
FACTOR_SUFFIXES = {
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "loralib": (".lora_A", ".lora_B"),
}


@dataclass
class Factors:
    """A state dict split by layout. factors: module name -> (A: (r, d_in), B: (d_out, r)),
    names as the file gives them (PEFT's prefix removed); alphas: per module where the file
    records α (kohya); extra: the remaining tensors by parameter name."""

    layout: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alphas: dict[str, float]
    extra: dict[str, torch.Tensor]


def peft_state_dict(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], extra: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PEFT's keys for factors {module: (A, B)} and extra tensors {param name: tensor}."""
    a_suffix, b_suffix = FACTOR_SUFFIXES["peft"]
    state = {}
    for name, (A, B) in factors.items():
        state[PEFT_PREFIX + name + a_suffix] = A
        state[PEFT_PREFIX + name + b_suffix] = B
    state.update({PEFT_PREFIX + name: t for name, t in extra.items()})
    return state


def split_state_dict(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Factors:
    """Detect the layout from the keys and split `tensors` into checked factors, α's and extras.

    Raises `AdapterFormatError(path, ...)` for: no tensors, no or mixed layouts, A without B,
    rank mismatch, non-2-D or empty factors, non-finite values, keys the layout cannot hold.
    """
    if not tensors:
        raise AdapterFormatError(path, "empty adapter: the file holds no tensors")
    layout = _detect_layout(tensors, path)
    a_suffix, b_suffix = FACTOR_SUFFIXES[layout]
    halves: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in tensors.items():
        for part, suffix in (("A", a_suffix), ("B", b_suffix)):
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            rest[key] = tensor
    factors = {}
    for name, pair in halves.items():
        if len(pair) == 1:
            have, lack = ("A", "B") if "A" in pair else ("B", "A")
            raise AdapterFormatError(path, f"module {shown(name)} has lora_{have} but no lora_{lack}")
        A, B = (_matricize(pair[p]) for p in "AB") if layout == "kohya" else (pair["A"], pair["B"])
        _check_factors(name, A, B, path)
        factors[name] = (A, B)
    alphas, extra = _split_rest(layout, rest, factors, path)
    for key, tensor in extra.items():
        _check_finite(key, tensor, path)
    if layout == "peft":
        factors = {_strip_peft_prefix(n): f for n, f in factors.items()}
        extra = {_strip_peft_prefix(k): t for k, t in extra.items()}
    return Factors(layout, factors, alphas, extra)


def _detect_layout(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    found = [layout for layout, suffixes in FACTOR_SUFFIXES.items() if any(k.endswith(suffixes) for k in tensors)]
    if not found:
        example = next(iter(tensors))
        raise AdapterFormatError(
            path,
            f"unknown key layout (e.g. {shown(example)}): expected PEFT '<module>.lora_A.weight', "
            "kohya '<name>.lora_down.weight' or loralib '<module>.lora_A' keys",
        )
    if len(found) > 1:
        raise AdapterFormatError(path, f"mixes key layouts {found}; expected one of them")
    return found[0]


def _split_rest(
    layout: str, rest: dict[str, torch.Tensor], factors: dict, path: str | os.PathLike
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Kohya: every other key must be `<name>.alpha` of a module. PEFT: no other LoRA tensors
    (DoRA magnitudes, embedding LoRA). The rest are extra tensors."""
    alphas: dict[str, float] = {}
    if layout == "kohya":
        for key, tensor in rest.items():
            name = key.removesuffix(".alpha")
            if name == key or name not in factors:
                raise AdapterFormatError(path, f"unexpected key {shown(key)} in a kohya LoRA file")
            if tensor.numel() != 1:
                raise AdapterFormatError(path, f"{shown(key)} must hold one number (alpha), got shape {tuple(tensor.shape)}")
            value = float(tensor.double().item())  # its own precision: a float64 1e300 is a finite α
            if not math.isfinite(value):
                raise AdapterFormatError(path, f"{shown(key)} (alpha) is {value}, not a finite number")
            alphas[name] = value
        return alphas, {}
    if layout == "peft":
        for key in rest:
            if any(part.startswith("lora_") for part in key.split(".")):
                raise AdapterFormatError(path, f"unsupported LoRA tensor {shown(key)} (DoRA or embedding LoRA?)")
    return alphas, rest


def _matricize(factor: torch.Tensor) -> torch.Tensor:
    """Kohya conv factors as matrices: down (r, c_in, kh, kw) → (r, c_in·kh·kw),
    up (c_out, r, 1, 1) → (c_out, r), so ΔW is the conv kernel flattened per output channel."""
    return factor.flatten(1) if factor.ndim == 4 else factor


def _check_factors(name: str, A: torch.Tensor, B: torch.Tensor, path: str | os.PathLike) -> None:
    for part, factor in (("lora_A", A), ("lora_B", B)):
        what = f"{part} of module {shown(name)}"
        if factor.ndim != 2:
            raise AdapterFormatError(path, f"{what} is {factor.ndim}-D {tuple(factor.shape)}, expected 2-D")
        if factor.numel() == 0:
            raise AdapterFormatError(path, f"{what} is empty {tuple(factor.shape)}")
        if not factor.is_floating_point():
            raise AdapterFormatError(path, f"{what} has dtype {factor.dtype}, expected floating point")
        _check_finite(f"{name}.{part}", factor, path)
    if A.shape[0] != B.shape[1]:
        raise AdapterFormatError(
            path,
            f"rank mismatch in module {shown(name)}: lora_A {tuple(A.shape)} has rank {A.shape[0]}, "
            f"lora_B {tuple(B.shape)} has rank {B.shape[1]}",
        )


def _check_finite(name: str, tensor: torch.Tensor, path: str | os.PathLike) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise AdapterFormatError(path, f"{name} has {bad} NaN/Inf value(s)")


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)
