"""What a training output directory holds, and when a run may write into it.

    adapter_model.safetensors   the adapter, PEFT layout  } replaced atomically at the end
    adapter_config.json                                   }
    metrics.json                written last, removed first: present = a finished run
    checkpoint.pt               while a run is unfinished (removed when it completes)
    .lora-analysis.lock         while a process trains into it (`fileio.lock_directory`)

`claim_output_dir` decides, so that no run silently replaces another's files:
- one process at a time: the directory is locked for the whole run (by rank 0 under DDP); a
  second run into it is refused naming the holder;
- without `resume`: a checkpoint (an unfinished run) or a trained adapter is refused unless
  `overwrite`;
- with `resume`: a checkpoint is continued; a finished run with the same recipe is returned as
  it is; adapter files with neither (another tool's adapter, a run killed while saving) are
  refused unless `overwrite`; an empty directory starts at step 0;
- `overwrite`: train from step 0; the old files stay until the new run replaces them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..adapters.files import CONFIG_NAME, WEIGHTS_NAMES
from ..errors import InputFileError, LoraAnalysisError
from ..fileio import lock_directory, read_json, remove_stale_temp_files
from .checkpoint import CHECKPOINT_NAME, is_eval_record, is_finite, is_int
from .config import TrainConfig
from .distributed import DistContext, decided_on_main

METRICS_NAME = "metrics.json"
OUTPUT_NAMES = (WEIGHTS_NAMES[0], CONFIG_NAME, METRICS_NAME)

T = TypeVar("T")

# Verdicts of claim_output_dir.
FRESH, RESUME, FINISHED = "fresh", "resume", "finished"


@contextlib.contextmanager
def locked_on_main(directory: Path, what: str, ctx: DistContext, inspect: Callable[[], T]) -> Iterator[T]:
    """`directory` locked by rank 0 (the process that writes there) for the `with` block, and
    `inspect()` run by rank 0 under the lock; every rank gets its result, or its error."""
    with contextlib.ExitStack() as held:

        def decide() -> T:
            held.enter_context(lock_directory(directory, what))
            return inspect()

        yield decided_on_main(decide, ctx)


def claim_output_dir(config: TrainConfig, directory: Path, ctx: DistContext) -> contextlib.AbstractContextManager[str]:
    """Lock `directory` (`config.output_dir`) for the `with` block and yield what to do there:
    FRESH (train from step 0), RESUME (continue its checkpoint) or FINISHED (the run is complete)."""

    def inspect() -> str:
        verdict = _verdict(directory, config)
        remove_stale_temp_files(directory)  # a SIGKILL can interrupt an atomic write
        return verdict

    return locked_on_main(directory, "training run", ctx, inspect)


def _verdict(directory: Path, config: TrainConfig) -> str:
    has_checkpoint = (directory / CHECKPOINT_NAME).exists()
    outputs = [name for name in OUTPUT_NAMES if (directory / name).exists()]
    if config.overwrite:
        return FRESH
    if config.resume:
        if has_checkpoint:
            return RESUME
        if (directory / METRICS_NAME).exists():
            return FINISHED  # its metrics and recipe are checked as it is loaded (loop.load_finished)
        if outputs:
            raise InputFileError(directory, f"holds {', '.join(outputs)} but neither a checkpoint nor a finished run's "
                                            f"{METRICS_NAME}: nothing to resume; replace them with --overwrite, or delete them")
        return FRESH
    if has_checkpoint:
        raise InputFileError(directory, f"holds an unfinished run ({CHECKPOINT_NAME}); continue it with --resume, "
                                        "or start over with --overwrite")
    if outputs:
        raise InputFileError(directory, f"holds a trained adapter ({', '.join(outputs)}); pass --overwrite to replace "
                                        "it, --resume to keep it if it is this run, or choose another output directory")
    return FRESH


def looks_finished(directory: Path) -> bool:
    """A finished run's files are there (not verified: `claim_output_dir` does that)."""
    return (directory / METRICS_NAME).is_file() and not (directory / CHECKPOINT_NAME).exists()


def read_metrics(path: Path) -> dict[str, Any]:
    """A finished run's metrics.json, refused (one line naming the file) unless it has the
    structure `train` writes: completed, the recipe as `config` (its recipe fields, a dict),
    steps, one finite loss per step, evaluation records, wall time."""
    metrics = read_json(path, "training metrics")
    problem = _metrics_problem(metrics)
    if problem:
        raise InputFileError(path, f"malformed training metrics: {problem}")
    try:
        TrainConfig.from_dict(metrics["config"])
    except (LoraAnalysisError, TypeError, ValueError) as err:
        raise InputFileError(path, f"malformed training metrics: 'config' is not a training config ({err})") from None
    return metrics


def _metrics_problem(metrics: Any) -> str | None:
    if not isinstance(metrics, dict):
        return "not a JSON object"
    if metrics.get("completed") is not True:
        return "the run is not marked completed"
    if not isinstance(metrics.get("config"), dict):
        return "'config' is not an object"
    steps, losses = metrics.get("steps"), metrics.get("train_loss")
    if not (is_int(steps) and steps >= 1):
        return "'steps' is not a positive integer"
    if not (isinstance(losses, list) and len(losses) == steps and all(is_finite(x) for x in losses)):
        return f"'train_loss' is not {steps} finite numbers"
    evals = metrics.get("evals")
    if not (isinstance(evals, list) and all(is_eval_record(e, steps) for e in evals)):
        return "'evals' are not records of a step and finite metrics"
    for key in ("initial", "final"):
        if metrics.get(key) is not None and not is_eval_record(metrics[key], steps):
            return f"{key!r} is not null or a record of a step and finite metrics"
    wall = metrics.get("wall_time_s")
    if not (is_finite(wall) and wall >= 0):
        return "'wall_time_s' is not a finite number >= 0"
    return None
