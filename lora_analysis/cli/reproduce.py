"""`lora-analysis reproduce`: the paper's Section 7 on a real model, end to end."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .main import add_common_options

EPILOG = """\
examples:
  lora-analysis reproduce                   # MiniLM + Rotten Tomatoes -> figures/ (~12 min on 2 idle CPU cores)
  lora-analysis reproduce --quick           # 4 steps per run, a first look -> runs/reproduce-minilm-rotten_tomatoes-quick/figures/
  lora-analysis reproduce --model ./my-bert --data reviews.csv --targets query,value --layers 0 6 11 --out my-figures

Trains (or reuses, from --run-dir) adapters of ranks 1, 2, 4, 8, 64 with two seeds on
{query,value} and {query}, then writes into --out: fig3, fig4, fig6, fig7, fig8 (PNG + PDF),
table7, table7_layers, rank_table and claims (markdown + CSV), results.json and README.md
with the paper's claims tested on this model (sign tests over every layer and seed against
random-direction nulls). An interrupted run resumes where it stopped.

--out may be new, empty, or a previous reproduction of the same model and data (its files are
replaced; a full one only by another full run); anything else holding files of the same names
is refused unless --force.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="reproduce the LoRA paper's Section 7 figures and tables on a real model",
        description="Train the rank x seed sweep and render the paper's Figures 3, 4, 6, 7, 8 and Tables 6, 7.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="minilm", help="'minilm' (built in) or a local HF model directory")
    parser.add_argument("--data", default="rotten_tomatoes",
                        help="rotten_tomatoes | sms_spam | trec, or a CSV/TSV/JSONL file (text,label columns)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: figures/; with --quick: RUN_DIR/figures, never figures/)")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even if it holds files of the same names that no reproduction wrote")
    parser.add_argument("--run-dir", type=Path, help="where adapters are trained/reused (default: runs/reproduce-MODEL-DATA)")
    parser.add_argument("--targets", default="query,value",
                        help="the projections compared, comma-separated (default: query,value = W_q, W_v)")
    parser.add_argument("--layers", type=int, nargs="+", help="layers in figures 6/7 (default: all)")
    parser.add_argument("--layer", type=int, help="layer of figures 3, 4, 8 and Table 7 (default: the middle one)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 200; 4 with --quick)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the training default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps per run: a first look, and the tests")
    parser.add_argument("--null-draws", type=int, metavar="N",
                        help="Haar-random draws behind each random baseline (default 1000; 200 with --quick)")
    add_common_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..reproduce import ReproduceConfig, reproduce
    from ..reproduce.render import claim_lines

    config = ReproduceConfig(
        model=args.model, data=args.data, out=args.out, run_dir=args.run_dir,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()], layers=args.layers,
        layer=args.layer, steps=args.steps, lr=args.lr, quick=args.quick, device=args.device,
        progress=not args.quiet, null_draws=args.null_draws, force=args.force,
    )
    command = "lora-analysis " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "lora-analysis reproduce"
    results = reproduce(config, command=command)
    if config.quick:
        print(f"note: --quick trains {config.train_config().steps} steps per adapter; the verdicts below describe "
              f"barely trained adapters, not the paper's claims (run without --quick for those)")
    for line in claim_lines(results["claims"]):
        print(line)
    print(f"figures and tables written to {config.out}/ (see {config.out}/README.md)")
    return 0

