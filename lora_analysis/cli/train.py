"""`lora-analysis train` and `lora-analysis sweep`: train LoRA adapters with our own core.

The parser reads `TrainConfig`'s defaults and the data tables, none of which import torch; the
training code is imported when a command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..config import ALL_LINEAR
from ..training.config import TrainConfig, parse_targets
from ..training.data import BUILTIN_DATASETS, TASKS
from .main import add_common_options

TRAIN_EPILOG = """\
examples:
  lora-analysis train --steps 200 --seed 0 --output-dir runs/r8
  lora-analysis train --data reviews.csv --text-column review --label-column stars --output-dir runs/mine
  lora-analysis train --model ./my-gpt2 --task causal-lm --data corpus.txt --targets c_attn --output-dir runs/lm
  lora-analysis train --steps 200 --output-dir runs/r8 --resume        # continue an interrupted run
  lora-analysis train --steps 200 --seed 1 --output-dir runs/r8 --overwrite   # replace what is there
  torchrun --nproc_per_node 2 -m lora_analysis train --output-dir runs/ddp   # DDP, rank 0 writes

The output directory is a PEFT adapter (adapter_model.safetensors + adapter_config.json, the
classifier head as modules_to_save) plus metrics.json; checkpoint.pt exists while it runs.
A directory holding a trained adapter or an unfinished run (checkpoint.pt) is refused unless
--resume (continue it; a finished run of the same settings is kept as it is) or --overwrite
(train from step 0 and replace it). A second run into a directory in use is refused.
"""

SWEEP_EPILOG = """\
examples:
  lora-analysis sweep --ranks 1 2 4 8 64 --seeds 0 1 --targets query,value query --output-dir runs/sweep
  lora-analysis sweep --ranks 8 64 --seeds 0 --steps 100 --output-dir runs/small

One subdirectory per cell (e.g. r8-s0-query_value) and manifest.json. Re-running the same
command skips finished cells and resumes unfinished ones; other settings are refused (use a new
output directory). A second sweep into a directory in use is refused.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    train_parser = subparsers.add_parser(
        "train", help="train a LoRA adapter", description="Train one LoRA adapter (our core, not peft).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_training_options(train_parser, sweep=False)
    train_parser.add_argument("--resume", action="store_true",
                              help="continue from OUTPUT_DIR/checkpoint.pt (a finished run of the same settings is kept)")
    train_parser.add_argument("--overwrite", action="store_true",
                              help="train from step 0 even if OUTPUT_DIR holds a trained adapter or a checkpoint, replacing them")
    add_common_options(train_parser)
    train_parser.set_defaults(func=run)

    sweep_parser = subparsers.add_parser(
        "sweep", help="train adapters over ranks x seeds x target sets",
        description="Train one adapter per (rank, seed, target set) cell into one run directory.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_training_options(sweep_parser, sweep=True)
    add_common_options(sweep_parser)
    sweep_parser.set_defaults(func=run_sweep_command)


def _add_training_options(parser: argparse.ArgumentParser, sweep: bool) -> None:
    d = TrainConfig()
    targets_help = f"comma-separated module-name suffixes, '{ALL_LINEAR}', or 're:<regex>' (default: query,value)"
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="'minilm' (built-in) or a local Hugging Face model directory")
    g.add_argument("--task", default=d.task, choices=TASKS)
    g.add_argument("--data", default=d.data, help=f"built-in ({', '.join(BUILTIN_DATASETS)}) or a .csv/.tsv/.jsonl/.txt file")
    g.add_argument("--text-column", help="text column (default: text)")
    g.add_argument("--label-column", help="label column (default: label)")
    g.add_argument("--labels", nargs="+", help="label values in class-id order; other labels are errors")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out fraction (default: %(default)s)")
    g.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/validation split")
    g = parser.add_argument_group("LoRA")
    if sweep:
        g.add_argument("--ranks", type=int, nargs="+", required=True, help="ranks r to train")
        g.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
        g.add_argument("--targets", nargs="+", default=["query,value"], help="target sets, each " + targets_help)
    else:
        g.add_argument("-r", "--rank", dest="r", type=int, default=d.r, help="LoRA rank (default: %(default)s)")
        g.add_argument("--seed", type=int, default=d.seed, help="seed: init, data order, dropout (default: %(default)s)")
        g.add_argument("--targets", default="query,value", help=targets_help)
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha; scale = alpha/r (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the LoRA path (default: %(default)s)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="linear warm-up share of steps (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step per process (default: %(default)s)")
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="tokens per example (default: %(default)s)")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="draw batches without grouping examples of similar length (more padding, slower)")
    g = parser.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="validate at step 0 and every N steps (default 0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every N steps (0: never)")
    g.add_argument("--device", default=d.device, help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--output-dir", required=True, help="adapter directory" + (" root: one subdirectory per cell" if sweep else ""))


def _config(args: argparse.Namespace, **cell: Any) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(cell, progress=not args.quiet)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.distributed import is_main_process

    result = train(_config(args, targets=parse_targets(args.targets)))
    if is_main_process():
        print(_summary(str(result.output_dir), result.metrics, result.status))
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    from ..training import cell_name, run_sweep
    from ..training.distributed import is_main_process

    target_sets = [parse_targets(t) for t in args.targets]
    base = _config(args, r=args.ranks[0], seed=args.seeds[0], targets=target_sets[0], output_dir=None)
    result = run_sweep(base, args.output_dir, args.ranks, args.seeds, target_sets)
    if not is_main_process():
        return 0
    for targets in target_sets:
        for r in args.ranks:
            for seed in args.seeds:
                name = cell_name(r, seed, targets)
                cell = result.manifest["cells"][name]
                print(_summary(name, {"final": cell["final"], "initial": cell["initial"], "wall_time_s": cell["wall_time_s"]}, cell["status"]))
    print(f"manifest: {result.manifest_path}")
    return 0


def _summary(name: str, metrics: dict[str, Any], status: str) -> str:
    final, initial = metrics.get("final") or {}, metrics.get("initial") or {}
    key = "val_accuracy" if "val_accuracy" in final else "val_perplexity"
    score = f"{key} {final[key]:.4f}" if key in final else "no validation set"
    if key in initial:
        score += f" (step 0: {initial[key]:.4f})"
    return f"{name}: {score}, {metrics.get('wall_time_s', 0):.1f} s [{status}]"
