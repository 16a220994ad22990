"""Data-parallel training with torch.distributed: the same command runs alone or under torchrun.

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) each process joins
one process group (NCCL on CUDA, gloo on CPU), trains a DDP replica on its slice of every
batch, and only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from ..errors import LoraAnalysisError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group once per process (left at exit); alone → rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it
        # is imported. DDP imports it (through torch._dynamo) lazily; imported after the group
        # exists, it would pin the group for the life of the process, and the group could not
        # be destroyed at exit (see _leave_process_group). Imported first, its defaults are None.
        # (import_module: an `import torch.…` statement here would make `torch` a local name of
        # this function, unbound on the lines above.)
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(_leave_process_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave_process_group() -> None:
    """Destroy the process group while the interpreter is fully alive, joining gloo's threads.

    Left alive to the end, a gloo worker thread can still be releasing the last collective's
    work when the interpreter finalizes: that work holds tensors with Python objects, releasing
    them needs the GIL, and a thread asking for the GIL during finalization is ended by
    pthread_exit, whose unwinding through C++ destructors calls std::terminate ("terminate
    called without an active exception", SIGABRT; seen in a core dump of a rank under CPU
    contention). Destroying the group waits for that work and joins the threads (torch
    releases the GIL while destroying a gloo group). The garbage collection first frees DDP
    wrappers, whose reference cycles hold the group."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes (identity when alone)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """[obj of rank 0, rank 1, ...] on rank 0, None elsewhere; [obj] when alone."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def decided_on_main(decide: Callable[[], T], ctx: DistContext) -> T:
    """`decide()` run on rank 0 alone (the process that owns the output files), its result
    given to every rank. When it raises, rank 0 re-raises and every other rank raises a
    `LoraAnalysisError` with the same message, so no rank waits forever for one that gave up."""
    if not ctx.enabled:
        return decide()
    outcome: list[Any] = [None]
    if ctx.is_main:
        try:
            outcome = [("ok", decide())]
        except Exception as err:
            dist.broadcast_object_list([("error", str(err))], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise LoraAnalysisError(value)
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def is_main_process() -> bool:
    """True outside a process group and on its rank 0: the process that prints and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0
