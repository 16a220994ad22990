"""Entry point: parse, dispatch to a subcommand, map errors to exit codes.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the file and the
problem; `--debug` shows the traceback); 1 unexpected failure.
Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func=run` on it; `run(args) -> int | None`. Start-up stays lean: subcommand modules import
only the standard library and torch-free tables at module level, so `--help`, `--version`
and argument errors never import torch; the work's imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings
from typing import TextIO

from ..errors import LoraAnalysisError, escaped
from ..version import __version__

# command -> the module under lora_analysis.cli that registers it (in the order --help lists them)
COMMANDS: dict[str, str] = {"train": "train", "sweep": "train", "evaluate": "train", "analyze": "analyze",
                            "compare": "analyze", "resize": "resize", "extract": "resize", "scan": "scan", "reproduce": "reproduce",
                            "study": "study"}
SUBCOMMANDS: list[str] = list(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the command line `argv`, only its command's module is registered (so
    `analyze` does not import the training tables `train`'s options are built from). Without a
    known command every one is, for --help and the error listing them."""
    parser = argparse.ArgumentParser(
        prog="lora-analysis",
        description="Rank analysis and interpretability of LoRA adapters (LoRA paper, Section 7).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = next((arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")), None)
    for name in [COMMANDS[command]] if command in COMMANDS else SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand accepts (also after the subcommand name)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device for subcommands that analyse (resolved by `lora_analysis.devices`)."""
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda:0, ...")


def add_svd_option(parser: argparse.ArgumentParser) -> None:
    """--svd for subcommands that decompose dense ΔW (full fine-tuning; `analysis.dense_svd`)."""
    parser.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                        help="SVD of dense ΔW (full fine-tuning): exact (LAPACK, float64), randomized (a sketch grown "
                             "until ‖(I − QQᵀ)ΔW‖_F ≤ 1%% of ‖ΔW‖_F, every σ reported with its deterministic bound), or "
                             "auto (default): exact below 2048 on the short side or where the sketch cannot reach the "
                             "bound cheaply, else randomized")


def add_force_option(parser: argparse.ArgumentParser) -> None:
    """--force for subcommands that write files the user names (rules: `lora_analysis.outputs`)."""
    parser.add_argument("--force", action="store_true",
                        help="replace output files that exist (an input is never written over)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():  # restored on return: main() may run inside a notebook or test
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except LoraAnalysisError as err:
        if args.debug:
            traceback.print_exc()
        print(f"lora-analysis: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-analysis: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        else:
            print(f"lora-analysis: unexpected error ({type(err).__name__}): {err}; rerun with --debug", file=sys.stderr)
        return 1


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings for CLI users: one line on stderr, no source location; text from files inside
    the message (module names) cannot break the line or send terminal escapes."""
    print(f"lora-analysis: warning: {escaped(message)}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
