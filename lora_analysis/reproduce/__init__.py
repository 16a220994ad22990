"""Reproduce Section 7 of the LoRA paper on a real model: train the sweep, render the figures.

    from lora_analysis.reproduce import ReproduceConfig, reproduce
    results = reproduce(ReproduceConfig(model="minilm", data="rotten_tomatoes", out="figures"))

See `experiment` (the sweep), `section7` (the numbers), `claims` (the paper's claims as tests)
and `render` (figures, tables, README).
"""

from __future__ import annotations

from . import claims, render
from .claims import Claim, ClaimPart, section7_claims
from .experiment import ReproduceConfig, Runs, train_sweep
from .render import check_output_dir, output_record, render_all
from .section7 import Section7


def reproduce(config: ReproduceConfig, command: str = "lora-analysis reproduce") -> dict:
    """Train (or reuse) the sweep and write every figure and table into `config.out`.

    Refuses (before training) an `out` that holds other files of the same names
    (`check_output_dir`; `config.force` overrides). Returns the numbers written to
    `config.out/results.json` (claims included).
    """
    out = config.out
    assert out is not None  # ReproduceConfig sets it
    check_output_dir(out, output_record(config), config.force)
    runs = train_sweep(config)
    return render_all(Section7(runs), out, command, progress=config.progress)


__all__ = ["Claim", "ClaimPart", "ReproduceConfig", "Runs", "Section7", "check_output_dir", "claims", "render",
           "render_all", "reproduce", "section7_claims", "train_sweep"]
