"""Where tensors are computed: the one rule turning a device setting into a `torch.device`."""

from __future__ import annotations

import torch

from .errors import LoraAnalysisError

AUTO = "auto"


def resolve_device(device: str | torch.device = AUTO, local_rank: int = 0) -> torch.device:
    """`device` as a `torch.device`: "auto" → CUDA when available, else the CPU.

    A bare "cuda" (or "auto" on a GPU machine) means this process's GPU, `local_rank` (one GPU
    per process under torchrun). Raises `LoraAnalysisError` for a name torch does not know and
    for a CUDA device on a machine without CUDA.
    """
    if device == AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoraAnalysisError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LoraAnalysisError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved
