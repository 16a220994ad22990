"""Training checkpoints: everything a resumed run needs to continue bit-identically.

One file, `<output_dir>/checkpoint.pt`, replaced atomically: the trainable tensors (LoRA
factors, head), optimizer and scheduler states, each process's RNG states, the step (which is
also the data position: batches are a function of seed and step), the metrics so far and the
recipe it was trained with. Loaded with `weights_only=True` (no pickle code execution).

A checkpoint is verified before anything of it is used, so a resumed run either continues
exactly the run that wrote it or is refused with one line naming the file:
- `checksum`: SHA-256 over every value of the payload (`payload_digest`): a flipped bit
  anywhere, in tensor data or in the step, is refused;
- the recipe must equal the current run's (`check_recipe`);
- structure: 1 ≤ step ≤ the run's steps, one loss per step, one RNG state per process of the
  size this torch uses, trainable tensors with the model's names, shapes and dtypes, an Adam
  state per step and shape (an emptied optimizer state would silently restart the moments).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from ..errors import InputFileError, shown
from ..fileio import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: a checksum over the payload; 1 (no checksum) cannot be verified
PAYLOAD_KEYS = ("format_version", "step", "recipe", "trainable", "optimizer", "scheduler", "rng", "progress", "checksum")


class CheckpointError(InputFileError):
    """A checkpoint that cannot be resumed: corrupt, malformed, or from another run."""


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and the CUDA device it trains on)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


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
    payload["checksum"] = payload_digest(payload)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of every value in `payload` but its "checksum": tensors by dtype, shape and
    raw bytes; containers by length and content (dict keys in sorted order); scalars by type
    and repr. Any change to what a resumed run would use changes the digest."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != "checksum"})
    return digest.hexdigest()


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        text = repr(value)
        digest.update(f"S{type(value).__name__}{len(text)}:{text}".encode())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of `path`, readable, of this format, complete and matching its checksum."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        reason = shown(str(err).split("\n")[0], 100)  # never torch's advice to pass weights_only=False
        raise CheckpointError(path, f"unreadable checkpoint ({type(err).__name__}: {reason})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(path, f"not a lora_analysis training checkpoint (format {FORMAT_VERSION})")
    if not (is_int(payload["format_version"]) and payload["format_version"] == FORMAT_VERSION):
        problem = (f"checkpoint format {shown(payload['format_version'], 20)} cannot be verified by this version "
                   f"(format {FORMAT_VERSION}); start over with --overwrite")
        raise CheckpointError(path, problem)
    missing = [key for key in PAYLOAD_KEYS if key not in payload]
    if missing:
        raise CheckpointError(path, f"malformed checkpoint: missing {missing}")
    try:
        actual = payload_digest(payload)
    except Exception as err:  # noqa: BLE001 - values a checkpoint never holds (sparse, nested too deeply)
        raise CheckpointError(path, f"malformed checkpoint: cannot checksum its content ({type(err).__name__})") from None
    if not isinstance(payload["checksum"], str) or actual != payload["checksum"]:
        raise CheckpointError(path, "corrupt checkpoint: its content does not match its checksum (damaged on disk?)")
    return payload


def check_recipe(path: Path, saved: Any, current: dict[str, Any], error: type[InputFileError] = CheckpointError) -> None:
    """A checkpoint only continues the run it came from: every recipe field must match."""
    if not isinstance(saved, dict):
        raise error(path, "malformed: the recorded recipe is not an object")
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {shown(old, 60)} -> {shown(new, 60)}" for k, (old, new) in sorted(changed.items()))
        raise error(path, f"cannot resume, the run was started with different settings ({details})")


def check_resumable(path: Path, state: dict[str, Any], *, steps: int, world_size: int, device: torch.device) -> int:
    """The checkpoint's step, after checking the parts a resumed run uses without torch's own
    checks: the step against the run's length, the progress record, the RNG states."""
    step = state["step"]
    if not is_int(step) or not 1 <= step <= steps:
        raise CheckpointError(path, f"malformed checkpoint: step {shown(step, 30)} is outside this run's 1..{steps}")
    _check_progress(path, state["progress"], step)
    rng = state["rng"]
    if not isinstance(rng, list) or len(rng) != world_size:
        count = len(rng) if isinstance(rng, list) else "no"
        raise CheckpointError(path, f"saved by {count} process(es); resume with the same number, not {world_size}")
    expected = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        expected["cuda"] = torch.cuda.get_rng_state(device)
    for rank, states in enumerate(rng):
        if not isinstance(states, dict) or "cpu" not in states:
            raise CheckpointError(path, f"malformed checkpoint: no CPU RNG state for process {rank}")
        for kind, reference in expected.items():
            saved = states.get(kind)
            if saved is not None and not _same_layout(saved, reference):
                raise CheckpointError(path, f"malformed checkpoint: process {rank}'s {kind} RNG state is not a "
                                            f"{reference.dtype} tensor of {reference.numel()} elements")
    return step


def _check_progress(path: Path, progress: Any, step: int) -> None:
    """{"train_loss": one finite loss per step, "evals": [{"step": int, "<metric>": float}], "wall_time_s": float ≥ 0}."""
    if not isinstance(progress, dict):
        raise CheckpointError(path, "malformed checkpoint: 'progress' is not an object")
    losses, evals, wall = progress.get("train_loss"), progress.get("evals"), progress.get("wall_time_s")
    if not isinstance(losses, list) or len(losses) != step or not all(is_finite(x) for x in losses):
        raise CheckpointError(path, f"malformed checkpoint: expected {step} finite training losses (one per step)")
    if not isinstance(evals, list) or not all(is_eval_record(e, step) for e in evals):
        raise CheckpointError(path, "malformed checkpoint: 'evals' must be records of a step and finite metrics")
    if not (is_finite(wall) and wall >= 0):
        raise CheckpointError(path, "malformed checkpoint: 'wall_time_s' must be a finite number >= 0")


def is_eval_record(record: Any, step: int) -> bool:
    """{"step": 0..step, "<metric>": finite number, ...}: one evaluation of a run."""
    return (
        isinstance(record, dict) and is_int(at := record.get("step")) and 0 <= at <= step
        and all(isinstance(k, str) and is_finite(v) for k, v in record.items())
    )


def restore(path: Path, state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, device: torch.device) -> None:
    """Put the checkpoint's trainable tensors, optimizer, scheduler and this rank's RNG states
    into the run, refusing anything that does not fit it exactly."""
    step = state["step"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = state["trainable"]
    if not isinstance(tensors, dict) or set(params) != set(tensors):
        found = set(tensors) if isinstance(tensors, dict) else set()
        diff = sorted(map(str, set(params) ^ found))[:3]
        raise CheckpointError(path, f"checkpoint does not match the model's trainable parameters (e.g. {shown(diff)})")
    for name, param in params.items():
        if not _same_layout(tensors[name], param):
            raise CheckpointError(path, f"{shown(name)} is not a {param.dtype} tensor of shape {tuple(param.shape)}")
    _check_adam_state(path, state["optimizer"], list(params.values()), step)
    _check_scheduler(path, state["scheduler"], step)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(path, f"malformed optimizer or scheduler state ({type(err).__name__}: {shown(err, 80)})") from None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    torch.set_rng_state(state["rng"][rank]["cpu"])
    if device.type == "cuda" and "cuda" in state["rng"][rank]:
        torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)


def _check_adam_state(path: Path, saved: Any, params: list[nn.Parameter], step: int) -> None:
    """AdamW's state_dict: one param group listing every parameter index, and for each
    parameter a state at `step` with moments of its shape."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    indices = [i for group in groups or [] if isinstance(group, dict) for i in group.get("params", [])]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(path, f"malformed checkpoint: the optimizer state is empty at step {step}")
    if not (all(is_int(i) for i in indices) and sorted(indices) == list(range(len(params)))):
        raise CheckpointError(path, f"malformed checkpoint: the optimizer's parameter groups do not list its {len(params)} parameters")
    for index, entry in state.items():
        if not (is_int(index) and 0 <= index < len(params) and isinstance(entry, dict)):
            raise CheckpointError(path, f"malformed checkpoint: optimizer state for unknown parameter {shown(index, 30)}")
        shape = params[index].shape
        moments_fit = all(isinstance(entry.get(k), torch.Tensor) and entry[k].shape == shape for k in ("exp_avg", "exp_avg_sq"))
        entry_step = entry.get("step")
        step_fits = isinstance(entry_step, torch.Tensor) and entry_step.numel() == 1 and entry_step.item() == step
        if not (moments_fit and step_fits):
            raise CheckpointError(path, f"malformed checkpoint: optimizer state of parameter {index} is not Adam's at step {step}")


def _check_scheduler(path: Path, saved: Any, step: int) -> None:
    if not isinstance(saved, dict) or not is_int(saved.get("last_epoch")) or saved["last_epoch"] != step:
        raise CheckpointError(path, f"malformed checkpoint: the learning-rate schedule is not at step {step}")


def _same_layout(tensor: Any, reference: torch.Tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dtype == reference.dtype and tensor.shape == reference.shape


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
