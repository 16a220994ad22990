"""`lora-analysis scan`: every adapter under a folder, analysed into one table.

Start-up stays lean: the scan (torch) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from .analyze import _positive_int
from .main import add_common_options, add_device_option

EPILOG = """\
Finds every adapter under ROOT (adapter directories such as PEFT's, and tensor files:
.safetensors, .bin, .pt, .pth), analyses each exactly from its factors, and writes one row per
module (shape, r, alpha, scale, ||dW||_F, sigma_1, stable / effective / energy ranks, numerical
rank) and one summary row per adapter. An adapter that cannot be read becomes a row with its
one-line error; the scan goes on. Adapters are named by their path relative to ROOT.

A re-run with the same -o skips the adapters already in it (a killed scan resumes; the table
is never left half-written). --shard i/n scans a fixed 1/n of the adapters, the same on every
machine, so a job array writes n tables that together are the table of one run:

examples:
  lora-analysis scan ./hub -o summary.csv
  lora-analysis scan ./hub -o summary.parquet --workers 2       # needs pyarrow
  sbatch --array=0-15 --wrap 'lora-analysis scan /hub --shard $SLURM_ARRAY_TASK_ID/16 -o part$SLURM_ARRAY_TASK_ID.jsonl'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scan", help="analyse every adapter under a folder into one table (CSV, JSON Lines, Parquet)",
        description="Scan a folder (a model hub, a sweep's runs) for adapters and tabulate their rank analysis.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", metavar="ROOT", help="folder to search (or one adapter file)")
    parser.add_argument("-o", "--output", metavar="FILE", default="summary.csv",
                        help="table to write or resume: .csv, .jsonl or .parquet (default: summary.csv)")
    parser.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                        help="analyse N adapters at a time in worker processes (default: 1)")
    parser.add_argument("--shard", metavar="I/N", default="0/1",
                        help="scan only shard I of N (0 <= I < N), e.g. a job array's task index (default: 0/1, all)")
    add_device_option(parser)
    add_common_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..scan import Shard, scan_adapters

    result = scan_adapters(args.root, args.output, workers=args.workers, shard=Shard.parse(args.shard),
                           device=args.device, progress=not args.quiet)
    if not args.quiet:
        print(f"lora-analysis: {args.output}: {result.scanned} adapter(s) scanned ({result.failed} unreadable), "
              f"{result.skipped} already there; shard {args.shard} holds {result.selected} of the "
              f"{result.found} found under {args.root}", file=sys.stderr)
    return 0

