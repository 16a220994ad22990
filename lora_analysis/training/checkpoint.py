"""Training checkpoints: everything a resumed run needs to continue bit-identically.

One file, `<output_dir>/checkpoint.pt`, replaced atomically: the trainable tensors (LoRA
factors, head), optimizer and scheduler states, each process's RNG states, the step (which is
also the data position: batches are a function of seed and step), the metrics so far and the
recipe it was trained with. Loaded with `weights_only=True` (no pickle code execution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoraAnalysisError
from ..fileio import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files a killed run left mid-write (`fileio.atomic_path` names them `.<name>.*.tmp`)."""
    for path in directory.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and the CUDA device it trains on)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    path: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng_states: list[dict[str, torch.Tensor]],
    progress: dict[str, Any],
    recipe: dict[str, Any],
) -> None:
    """Write the checkpoint atomically. `rng_states[k]` is rank k's; `progress` is JSON-like."""
    payload = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "recipe": recipe,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "progress": progress,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise LoraAnalysisError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise LoraAnalysisError(f"{path}: not a lora_analysis training checkpoint (format {FORMAT_VERSION})")
    return payload


def check_recipe(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint only continues the run it came from: every recipe field must match."""
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise LoraAnalysisError(f"{path}: cannot resume, the run was started with different settings ({details})")


def restore_trainable(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into `model` (names and shapes must match exactly)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        diff = sorted(set(params) ^ set(tensors))[:3]
        raise LoraAnalysisError(f"{path}: checkpoint does not match the model's trainable parameters (e.g. {diff})")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != tensors[name].shape:
                raise LoraAnalysisError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
            param.copy_(tensors[name])
