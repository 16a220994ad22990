"""Reproduce Section 7 of the LoRA paper on a real model: train the sweep, render the figures.

    from lora_analysis.reproduce import ReproduceConfig, reproduce
    results = reproduce(ReproduceConfig(model="minilm", data="rotten_tomatoes", out="figures"))

See `experiment` (the sweep), `section7` (the numbers) and `render` (figures, tables, README).
"""

from __future__ import annotations

from . import render
from .experiment import ReproduceConfig, Runs, train_sweep
from .render import render_all
from .section7 import Section7


def reproduce(config: ReproduceConfig, command: str = "lora-analysis reproduce") -> dict:
    """Train (or reuse) the sweep and write every figure and table into `config.out`.

    Returns the numbers written to `config.out/results.json` (claims included).
    """
    runs = train_sweep(config)
    return render_all(Section7(runs), config.out, command, progress=config.progress)


__all__ = ["ReproduceConfig", "Runs", "Section7", "render", "render_all", "reproduce", "train_sweep"]
