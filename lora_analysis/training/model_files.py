"""A fully fine-tuned model saved as a Hugging Face model directory.

    config.json, generation_config.json (causal LMs)       the model's configuration
    model.safetensors                                      the weights, one file up to max_shard_size
    model-00001-of-0000N.safetensors + model.safetensors.index.json    or shards above it
    tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt, ...)

`AutoModelForSequenceClassification` / `AutoModelForCausalLM.from_pretrained(directory)`
loads it (and `lora-analysis train --model directory` trains on from it). Files are written by
transformers' own `save_pretrained` into a staging directory inside the output directory and
moved onto their names one by one (each rename atomic); weight files of an earlier save that
the new one does not have (other shards, a LoRA adapter the directory held before
`--overwrite`) are removed afterwards. Completeness is marked by the run's `metrics.json`,
written after all of this (see `output_dir`).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from ..fileio import publish_file, staging_directory
from .models import quiet_transformers

# Weight files of a trained output, by either method: a directory receiving one method's
# output loses the other's (and earlier shards) once the new files are in place.
WEIGHT_FILE_PATTERNS = (
    "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin",
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json",
)


# The other files a model directory holds (configuration and the tokenizer files transformers
# writes): a directory holding any of them is not written into without --overwrite.
MODEL_DIR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def weight_files(directory: Path) -> list[str]:
    """Names of the weight files (`WEIGHT_FILE_PATTERNS`) in `directory`, sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and is_weight_file(p.name)) if directory.is_dir() else []


def save_model_dir(model: Any, tokenizer: Any, directory: Path, max_shard_size: int) -> list[str]:
    """Save `model` (a transformers `PreTrainedModel`) and `tokenizer` into `directory` as a
    Hugging Face model directory, safetensors weights sharded above `max_shard_size` bytes;
    return the names of the files written. See the module docstring for the order of writes."""
    with staging_directory(directory) as staging, quiet_transformers():
        model.save_pretrained(staging, max_shard_size=max_shard_size)  # safetensors: the default since transformers 4.35
        tokenizer.save_pretrained(staging)
        written = sorted(p.name for p in staging.iterdir())
        for name in written:
            publish_file(staging / name, directory / name)
    remove_other_weight_files(directory, keep=set(written))
    fsync_directory(directory)
    return written


def remove_other_weight_files(directory: Path, keep: set[str]) -> list[str]:
    """Delete the weight files in `directory` not in `keep` (the output just written), so one
    directory never holds two models' weights. Returns the names removed."""
    removed = [name for name in weight_files(directory) if name not in keep]
    for name in removed:
        (directory / name).unlink(missing_ok=True)
    return removed


def fsync_directory(directory: Path) -> None:
    """Make the renames and removals in `directory` durable (POSIX; a no-op where directories
    cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def linear_layers(directory: str | os.PathLike) -> set[str] | None:
    """Names of the `nn.Linear` modules of the model a Hugging Face model directory describes
    (its `config.json`: the class of `architectures[0]`, else the bare `AutoModel`), built on
    the meta device (no weights read, no memory); None without a `config.json`. What `extract`
    may turn into LoRA modules: embeddings (PEFT's `lora_embedding_A/B`) and GPT-2's Conv1D
    (fan_in_fan_out) have other layouts."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        return None
    import torch
    from torch import nn

    from .models import _import_transformers

    transformers = _import_transformers()
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(path)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config) if model_class is None else model_class(config)
    return {name for name, module in model.named_modules() if type(module) is nn.Linear}
