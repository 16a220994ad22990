"""`lora-analysis study`: seven questions beyond the paper's Section 7, with error bars (issue 13)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .main import add_common_options

EPILOG = """\
examples:
  lora-analysis study                       # MiniLM on rotten_tomatoes, sms_spam, trec -> figures/study/
  lora-analysis study --quick               # 4 steps per cell, a first look -> runs/study-minilm-quick/figures/
  lora-analysis study --tasks trec sms_spam --seeds 5 --out my-study

Trains (or reuses, from the run directories `reproduce` uses: RUNS_ROOT/reproduce-MODEL-TASK)
LoRA adapters at several ranks and full fine-tuning with several seeds, answers each question
with a measurement, 95 % confidence intervals and a verdict ("holds", "does not hold",
"inconclusive at this sample size") from a stated rule, and writes into --out one figure per
question (PNG + PDF), results.json and README.md. An interrupted study resumes.

--out may be new, empty, or a previous study of the same model and tasks (its files are
replaced; a full one only by another full run); anything else holding files of the same names
is refused unless --force.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study", help="answer seven questions about LoRA's rank beyond Section 7, with error bars",
        description="Train (or reuse) LoRA and full fine-tuning runs over seeds and answer the study's questions.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="minilm", help="'minilm' (built in) or a local HF model directory")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="built-in data sets, the first is the main task (default: rotten_tomatoes sms_spam trec)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: figures/study; with --quick: RUNS_ROOT/study-MODEL-quick/figures)")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"),
                        help="where the per-task run directories live (default: runs, shared with reproduce)")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="seeds 0..N-1 for every cell (default 3; 2 with --quick); question 5 uses max(N, 5)")
    parser.add_argument("--quick", action="store_true", help="two seeds, ranks 8 and 64, 4 steps per cell: a first look")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even if it holds files of the same names that no study wrote")
    add_common_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import LoraAnalysisError
    from ..study import StudyConfig, run_study
    from ..study.config import FULL_GRID
    from ..study.render import in_order

    seeds: tuple[int, ...] = ()
    stability: tuple[int, ...] = ()
    if args.seeds is not None:
        if args.seeds < 2:
            raise LoraAnalysisError(f"--seeds must be at least 2 (intervals over seeds), got {args.seeds}")
        seeds = tuple(range(args.seeds))
        stability = seeds if args.quick else tuple(range(max(args.seeds, len(FULL_GRID["stability_seeds"]))))
    config = StudyConfig(
        model=args.model, tasks=tuple(args.tasks) if args.tasks else StudyConfig.tasks, out=args.out,
        runs_root=args.runs_root, seeds=seeds, stability_seeds=stability, quick=args.quick, device=args.device,
        progress=not args.quiet, force=args.force,
    )
    command = "lora-analysis " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "lora-analysis study"
    results = run_study(config, command=command)
    if config.quick:
        print("note: --quick trains 4 steps per cell; the verdicts below describe barely trained runs, not the questions "
              "(run without --quick for those)")
    for key, question in in_order(results):
        print(f"{question['number']}. {question['question']} ({key})")
        for verdict in question["verdicts"]:
            print(f"    {verdict['verdict']}: {verdict['effect']}")
    print(f"figures and results written to {config.out}/ (see {config.out}/README.md)")
    return 0
