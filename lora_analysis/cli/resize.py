"""`lora-analysis resize` (a smaller adapter, the best of its rank) and `lora-analysis extract`
(a LoRA out of a full fine-tune): one code path, `analysis.resize.resize_adapter`, on an
adapter's ΔW or on a model pair's dense ΔW = W_ft − W₀.

Output rules: `-o OUT` (a directory in PEFT's layout, or one `.safetensors` file) is never
written over an existing adapter without `--force`, and never over an input, even with it.
stdout carries the per-module table (text or JSON); progress goes to stderr.

`--eval` evaluates the new adapter and the original on the task's validation split
(`training.resize_eval`); `--sweep-ranks` resizes to each rank and tabulates energy kept (and,
with --eval, accuracy) against rank, writing one adapter per rank only under `-o DIR/rank-K`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LoraAnalysisError
from ..fileio import dumps_json
from ..training.data import BUILTIN_DATASETS, TASKS
from .analyze import _add_module_filter, _emit, _examples, _load, _model_pair, _positive_int, _progress, _select, base_model_path
from .analyze import _write as _write_file
from .main import add_common_options, add_device_option, add_svd_option

if TYPE_CHECKING:
    import torch

    from ..adapters import Adapter, Update
    from ..analysis.spectrum import BaseWeightSource
    from ..config import LoraConfig
    from ..analysis.resize import RankRule, ResizeResult
    from ..training.config import TrainConfig
    from ..training.evaluation import EvalResult
    from ..training.resize_eval import RankPoint

RULES_HELP = """\
rank rules, each applied to every module's own spectrum σ₁ ≥ σ₂ ≥ … (numerically zero σ never kept):
  --rank R        k = min(R, numerical rank of ΔW)
  --energy E      smallest k with Σ_{i≤k}σ² ≥ E·Σσ²  (E in (0, 1])
  --sv-ratio X    k = #{i: σᵢ ≥ σ₁/X}  (kohya's sv_ratio, X ≥ 1)
  --fro F         smallest k with √Σ_{i≤k}σ² ≥ F·‖ΔW‖_F  (kohya's sv_fro; the same as --energy F²)

Each module becomes ΔW_k = U_k Σ_k V_kᵀ, the best rank-k approximation (Eckart–Young), written as
LoRA factors B = U_k Σ_k^½, A = Σ_k^½ V_kᵀ with lora_alpha = k (scale 1) and per-module ranks in
rank_pattern, so PEFT loads it. The table gives per module the exact error ‖ΔW − ΔW_k‖_F =
√Σ_{i>k}σᵢ², the energy kept and the parameters before and after.

verified by accuracy:
  --eval              evaluate the new adapter and the original on the task's validation split
                      (the split, batch size and metrics of `lora-analysis evaluate`). The task is
                      the run's metrics.json beside the input, or --data (and --task).
  --sweep-ranks R...  instead of one rule: the best adapter of each rank R; a table of energy kept
                      and relative error over all modules (and, with --eval, accuracy) per rank;
                      --plot FILE draws it. Adapters are written only with -o DIR (DIR/rank-R each).
"""

RESIZE_EPILOG = RULES_HELP + """
examples:
  lora-analysis resize ./adapter --rank 4 -o ./adapter-r4
  lora-analysis resize kohya_lora.safetensors --energy 0.9 -o small.safetensors --format json
  lora-analysis resize ./dora-adapter --base ./base-model --sv-ratio 10 -o ./lora-r-auto
  lora-analysis resize runs/r8 --rank 2 -o ./r8-to-2 --eval
  lora-analysis resize runs/r8 --sweep-ranks 1 2 4 8 --eval --plot curve.png
  lora-analysis resize adapter.safetensors --rank 4 -o r4 --eval --data reviews.csv --model ./my-bert
"""

EXTRACT_EPILOG = RULES_HELP + """
Only nn.Linear layers become LoRA modules (read from the model's config.json; embeddings and
GPT-2's Conv1D have other PEFT layouts and are left out, listed on stderr); --modules narrows the
choice. The models are read one module at a time.

examples:
  lora-analysis extract ./full-finetuned --base ./bert-base-uncased --rank 16 -o ./extracted
  lora-analysis extract ./full-finetuned --base ./bert-base-uncased --energy 0.9 --modules '*attention*' -o x.safetensors
  lora-analysis extract runs/full --base minilm --sweep-ranks 1 4 16 64 --eval --plot curve.pdf

With --eval on a classification model the extracted adapter carries the fine-tuned task head
(classifier, score, …) as modules_to_save: without it the LoRA would sit under a random head.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    resize = subparsers.add_parser(
        "resize", help="the best adapter of a smaller rank (truncated SVD of each module's ΔW)",
        description="Resize an adapter (any readable format and kind) to the best LoRA of the chosen ranks, "
                    "PEFT layout out.",
        epilog=RESIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resize.add_argument("adapter", metavar="ADAPTER", help="adapter file or directory")
    resize.add_argument("--base", metavar="MODEL", help="pretrained weights, for DoRA adapters (their ΔW needs W₀)")
    resize.add_argument("--alpha", type=float, metavar="ALPHA", help="LoRA alpha where the file does not record it")
    resize.add_argument("--dora-direction", action="store_true",
                        help="resize DoRA modules' direction update s·B·A alone instead of refusing them without --base")
    _add_shared(resize)
    resize.add_argument("--model", metavar="MODEL",
                        help="with --eval: the model the adapter is applied to (default: the run's, from its metrics.json)")
    resize.set_defaults(func=run_resize)

    extract = subparsers.add_parser(
        "extract", help="a LoRA adapter out of a full fine-tune (truncated SVD of W_ft − W₀)",
        description="Extract a LoRA adapter from a fully fine-tuned model and its base, PEFT layout out.",
        epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    extract.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model directory or weights file")
    extract.add_argument("--base", metavar="MODEL", required=True,
                         help="the base model it was fine-tuned from (directory, weights file, or 'minilm')")
    _add_shared(extract)
    extract.set_defaults(func=run_extract)


def _add_shared(parser: argparse.ArgumentParser) -> None:
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=_positive_int, metavar="R", help="keep the top R directions per module")
    rule.add_argument("--energy", type=float, metavar="E", help="keep the smallest rank holding E of ‖ΔW‖²_F")
    rule.add_argument("--sv-ratio", type=float, metavar="X", help="keep σᵢ ≥ σ₁/X")
    rule.add_argument("--fro", type=float, metavar="F", help="keep the smallest rank holding F of ‖ΔW‖_F")
    rule.add_argument("--sweep-ranks", type=_positive_int, nargs="+", metavar="R",
                      help="the best adapter of each rank R: a table (and --plot) of energy kept and accuracy against rank")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="output: a directory (PEFT layout) or a file ending in .safetensors; with --sweep-ranks "
                             "an optional directory, one adapter per rank in OUT/rank-R")
    parser.add_argument("--force", action="store_true", help="replace an existing adapter at OUT (never an input)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="per-module table on stdout (default: text)")
    _add_module_filter(parser)
    add_device_option(parser)
    add_svd_option(parser)
    parser.add_argument("--plot", metavar="FILE", help="with --sweep-ranks: accuracy and energy kept against rank (.png, .pdf, .svg)")
    task = parser.add_argument_group("verified by accuracy")
    task.add_argument("--eval", action="store_true", help="evaluate the new adapter and the original on the validation split")
    task.add_argument("--data", help=f"with --eval: the data set (built-in {', '.join(BUILTIN_DATASETS)}, or a file; "
                                     "default: the run's metrics.json)")
    task.add_argument("--task", choices=TASKS, help="with --eval --data: the task (default: the run's, else classification)")
    add_common_options(parser)


def run_resize(args: argparse.Namespace) -> int:
    args.base = base_model_path(args.base)
    rule = _rule(args)
    _check_outputs(args, [args.adapter, args.base])
    task = _task(args, args.adapter, model=None)
    base = None
    if args.base:
        from ..base_weights import BaseWeights

        base = BaseWeights(args.base)
    adapter = _select(_load(args.adapter, args, base, alpha=args.alpha), args.modules, args.adapter)

    def weight(name: str, update: Update) -> torch.Tensor:  # W₀ for DoRA modules
        assert base is not None
        return base.weight(name, update.info)

    _progress(args, f"resizing {len(adapter)} module(s) of {args.adapter} ({_describe(rule, args)})")
    return _finish(adapter, rule, args, args.adapter, task, base=weight if base is not None else None)


def run_extract(args: argparse.Namespace) -> int:
    from ..model_pair import is_model_checkpoint
    from ..training.model_files import linear_layers

    recorded = args.base  # in the adapter's config: "minilm", or the directory's name
    args.base = base_model_path(args.base)
    rule = _rule(args)
    _check_outputs(args, [args.finetuned, args.base])
    task = _task(args, args.finetuned, model=args.base)
    if not is_model_checkpoint(args.finetuned):
        raise LoraAnalysisError(f"{args.finetuned}: not a model directory or model weights file (an adapter? use resize)")
    pair = _model_pair(args.finetuned, args.base, args.modules)
    assert pair is not None
    linear = linear_layers(args.finetuned)
    if linear is None and not args.modules:
        raise LoraAnalysisError(f"{args.finetuned}: no config.json to tell Linear layers from embeddings: "
                                "choose the modules with --modules")
    if linear is not None:
        from ..naming import strip_known_prefixes

        stripped = {strip_known_prefixes(n) for n in linear}
        kept = [n for n in pair.modules if n in linear or strip_known_prefixes(n) in stripped]
        left = [n for n in pair.modules if n not in kept]
        if left:
            _progress(args, f"{len(left)} weight(s) not on nn.Linear layers left out: {_examples(left)}")
        if not kept:
            raise LoraAnalysisError(f"{args.finetuned}: none of the selected weights is an nn.Linear layer's")
        pair = pair.select(kept)
    _progress(args, f"extracting {len(pair)} module(s) of {args.finetuned} against {args.base} ({_describe(rule, args)})")
    from ..config import LoraConfig

    if task is not None:
        from ..training.resize_eval import task_head

        task.head = task_head(args.finetuned, task.recipe)
    config = LoraConfig(base_model_name_or_path=recorded)
    return _finish(pair, rule, args, args.finetuned, task, config=config)


@dataclass
class _Task:
    """What --eval evaluates on: the recipe (data, split, task), the model the new adapter is
    applied to (None: the recipe's), and the task head an extracted adapter must carry."""

    recipe: TrainConfig
    model: str | None
    head: dict[str, Any]


def _task(args: argparse.Namespace, source: str, model: str | None) -> _Task | None:
    """The task --eval evaluates on, or None without --eval; refused in one line when unknown.
    `model`: what a new adapter is applied to (extract: the base; resize: None, the recipe's)."""
    from ..training.evaluation import is_model_dir
    from ..training.resize_eval import check_task, task_recipe

    chosen = {key: getattr(args, key, None) for key in ("data", "task", "model")}
    chosen = {key: value for key, value in chosen.items() if value}
    if not args.eval:
        if chosen:
            raise LoraAnalysisError(f"--{next(iter(chosen))} chooses what --eval evaluates on: pass --eval too")
        return None
    recorded = task_recipe(source) is not None
    resize = model is None
    if not recorded and not ("data" in chosen and ("model" in chosen or not resize)):
        wanted = "--data DATA (and --task)" + (" and --model MODEL, the model it was trained on" if resize else "")
        raise LoraAnalysisError(f"{source}: no metrics.json beside it records the task to evaluate on: pass {wanted}")
    recipe = task_recipe(source, chosen)
    assert recipe is not None
    if not resize and not is_model_dir(Path(source)):
        raise LoraAnalysisError(f"{source}: --eval evaluates the fine-tuned model too: give its model directory "
                                "(config.json, weights and tokenizer)")
    check_task(recipe, model)
    return _Task(recipe, model, {})


def _finish(adapter: Adapter, rule: RankRule | None, args: argparse.Namespace, source: str, task: _Task | None,
            base: BaseWeightSource | None = None, config: LoraConfig | None = None) -> int:
    if rule is None:
        return _sweep(adapter, args, source, task, base, config)
    from ..analysis.resize import resize_adapter
    from ..training.resize_eval import with_head

    result = resize_adapter(adapter, rule, base=base, config=config, device=args.device, progress=not args.quiet,
                            svd=args.svd)
    if task is not None:
        result.adapter = with_head(result.adapter, task.head)
    _write(result.adapter, args.output, [source, args.base], args)
    result.notes[:0] = adapter.notes
    evaluations = None
    if task is not None:
        evaluations = (_evaluate(source, task, args, original=True), _evaluate(result.adapter, task, args))
    _emit(_render(result, source, args.format, evaluations), args_without_output(args))
    return 0


def _sweep(adapter: Adapter, args: argparse.Namespace, source: str, task: _Task | None,
           base: BaseWeightSource | None, config: LoraConfig | None) -> int:
    from ..training.resize_eval import rank_sweep

    outputs = {k: str(Path(args.output) / f"rank-{k}") for k in args.sweep_ranks} if args.output else {}

    def write(k: int, resized: Adapter) -> None:
        if outputs:
            Path(args.output).mkdir(exist_ok=True)  # the one folder the sweep creates (checked before the work)
            _write(resized, outputs[k], [source, args.base], args)

    points = rank_sweep(adapter, args.sweep_ranks, recipe=task.recipe if task else None, model=task.model if task else None,
                        head=task.head if task else None, base=base, config=config, device=args.device,
                        progress=not args.quiet, on_result=write, svd=args.svd)
    original = _evaluate(source, task, args, original=True) if task is not None else None
    if args.plot:
        _plot(points, original, args.plot, args)
    _emit(_render_sweep(points, adapter, source, args.format, original, outputs), args_without_output(args))
    return 0


def _write(adapter: Adapter, output: str, inputs: list[str | None], args: argparse.Namespace) -> None:
    from ..adapters import save_adapter
    from ..outputs import OutputError

    _check_output(output, inputs, args.force)  # again: the work took a while
    try:
        written = save_adapter(adapter, output)
    except OSError as err:
        raise OutputError(output, f"cannot write ({err.strerror or err})") from None
    _progress(args, f"wrote {written}")


def _evaluate(source: str | Adapter, task: _Task, args: argparse.Namespace, original: bool = False) -> EvalResult:
    """The original (`source` as given: an adapter on the recipe's model, or a fine-tuned model
    directory) or a new adapter (on `task.model`, default the recipe's), on the recipe's split."""
    from ..training.evaluation import evaluate

    return evaluate(source, task.recipe, base=None if original else task.model, device=args.device,
                    progress=not args.quiet)


def _plot(points: list[RankPoint], original: EvalResult | None, path: str, args: argparse.Namespace) -> None:
    """Energy kept and (evaluated) the validation metric against rank, the original's as a line."""
    from ..plots import figure_bytes, figure_format, rank_curve_figure

    metric = _metric(original) if original is not None else None
    values = [p.evaluation.metrics[metric] for p in points if p.evaluation is not None] if metric else None
    figure = rank_curve_figure([p.rank for p in points], [p.result.energy_kept for p in points], metric=values,
                               metric_label=metric, reference=original.metrics[metric] if original and metric else None)
    _write_file(path, figure_bytes(figure, figure_format(path)), args)


def _metric(evaluation: EvalResult | None) -> str:
    assert evaluation is not None
    return "val_accuracy" if evaluation.accuracy is not None else "val_perplexity"


def args_without_output(args: argparse.Namespace) -> argparse.Namespace:
    """The table goes to stdout: -o names the adapter here, not the report."""
    return argparse.Namespace(**{**vars(args), "output": None})


def _rule(args: argparse.Namespace) -> RankRule | None:
    """The rank rule, or None for --sweep-ranks."""
    from ..analysis.resize import RankRule

    if args.sweep_ranks:
        return None
    for kind in ("rank", "energy", "sv_ratio", "fro"):
        value = getattr(args, kind)
        if value is not None:
            return RankRule(kind, float(value))
    raise LoraAnalysisError("choose one of --rank, --energy, --sv-ratio, --fro")


def _describe(rule: RankRule | None, args: argparse.Namespace) -> str:
    return rule.describe() if rule is not None else "ranks " + " ".join(map(str, args.sweep_ranks))


def _check_outputs(args: argparse.Namespace, inputs: list[str | None]) -> None:
    """-o, --plot and the rule agree, and nothing would be overwritten (checked before any work)."""
    if args.plot:
        from ..outputs import check_outputs
        from ..plots import figure_format

        if not args.sweep_ranks:
            raise LoraAnalysisError("--plot draws the --sweep-ranks curve: pass --sweep-ranks R ... too")
        figure_format(args.plot)
        check_outputs({"--plot": args.plot}, inputs, force=args.force)
    if not args.sweep_ranks:
        if not args.output:
            raise LoraAnalysisError("-o OUT is required: the adapter's file or directory")
        _check_output(args.output, inputs, args.force)
        return
    if args.output:
        if Path(args.output).suffix == ".safetensors":
            raise LoraAnalysisError(f"{args.output}: --sweep-ranks writes one adapter per rank: give -o a directory")
        if not Path(args.output).exists():  # the one folder the sweep creates; its rank-R folders are new
            _check_output(args.output, inputs, args.force)
            return
        for k in args.sweep_ranks:
            _check_output(str(Path(args.output) / f"rank-{k}"), inputs, args.force)


def _check_output(output: str, inputs: list[str | None], force: bool) -> None:
    """The output rules (`lora_analysis.outputs`): never over or into an input, an existing
    adapter replaced only with --force; a directory output may be created, not its parents."""
    from ..outputs import check_outputs

    directories = [] if Path(output).suffix == ".safetensors" else ["-o"]
    check_outputs({"-o": output}, inputs, force=force, directories=directories)


def _render(result: ResizeResult, source: str, fmt: str, evaluations: tuple[EvalResult, EvalResult] | None) -> str:
    from ..analysis.resize import resize_table

    rows = resize_table(result.modules)
    before = sum(r["parameters_before"] for r in rows)
    after = sum(r["parameters_after"] for r in rows)
    if fmt == "json":
        document = {"kind": "resize", "source": source, "rule": {"kind": result.rule.kind, "value": result.rule.value},
                    "modules": rows, "parameters_before": before, "parameters_after": after,
                    "energy_kept": result.energy_kept, "relative_error": result.relative_error, "notes": result.notes}
        if evaluations is not None:
            document["evaluation"] = {**_split(evaluations[0]), "original": evaluations[0].metrics,
                                      "resized": evaluations[1].metrics}
        return dumps_json(document, indent=2) + "\n"
    header = ["module", "shape", "r before", "num. rank", "r", "‖ΔW‖_F", "‖ΔW−ΔW_k‖_F", "rel. error", "energy kept", "params"]
    lines = [[r["module"], "×".join(map(str, r["shape"])), "—" if r["rank_before"] is None else str(r["rank_before"]),
              "—" if r["numerical_rank"] is None else str(r["numerical_rank"]), str(r["rank"]), f"{r['frobenius']:.6g}", f"{r['error']:.6g}",
              f"{r['relative_error']:.4g}", f"{100 * r['energy_kept']:.4f}%", f"{r['parameters_before']:,} → {r['parameters_after']:,}"]
             for r in rows]
    randomized = any(r["svd"] == "randomized" for r in rows)
    if randomized:  # which SVD, per module, and the bound: the excess over the rank-k optimum
        header.append("SVD")
        for line, r in zip(lines, rows):
            line.append("exact" if r["svd"] == "exact" else f"randomized, ‖E‖_F {r['svd_residual']:.3g}")
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"{source}: {result.rule.describe()}", "  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.append(f"parameters: {before:,} → {after:,}; over all modules: energy kept {100 * result.energy_kept:.4f}%, "
               f"relative error {result.relative_error:.4g}")
    if evaluations is not None:
        original, resized = evaluations
        out.append(f"validation ({original.examples} examples of {original.config.data}): original {_score(original)}; "
                   f"resized {_score(resized)}")
    out += [f"note: {note}" for note in result.notes]
    out.append("‖ΔW−ΔW_k‖_F = √Σ_{i>k}σᵢ² (Eckart–Young: the least error of any rank-k update); energy kept Σ_{i≤k}σ²/Σσ²")
    if randomized:
        out.append("randomized SVD (range basis Q, B = QᵀΔW, E = (I − QQᵀ)ΔW): the module is cut to Q·B_k; its error "
                   "√(‖E‖²_F + Σ_{i>k}σᵢ(B)²) and energy kept are exact, its squared error exceeds the rank-k optimum's "
                   "by at most ‖E‖²_F, and the rules apply to σ(B)")
    return "\n".join(out) + "\n"


def _split(evaluation: EvalResult) -> dict[str, Any]:
    """The validation split evaluated on, for JSON reports."""
    config = evaluation.config
    return {"task": evaluation.task, "data": config.data, "val_fraction": config.val_fraction,
            "split_seed": config.split_seed, "examples": evaluation.examples}


def _score(evaluation: EvalResult) -> str:
    key = _metric(evaluation)
    return f"{key} {evaluation.metrics[key]:.4f}, val_loss {evaluation.metrics['val_loss']:.4f}"


def _render_sweep(points: list[RankPoint], adapter: Adapter, source: str, fmt: str, original: EvalResult | None,
                  outputs: dict[int, str]) -> str:
    """The rank curve: per rank, energy kept and relative error over all modules, the adapter's
    parameters and (evaluated) its validation metrics."""
    before = sum(m.parameters_before for m in points[0].result.modules.values())
    rows: list[dict[str, Any]] = [{"rank": p.rank, "energy_kept": p.result.energy_kept, "relative_error": p.result.relative_error,
             "parameters": sum(m.parameters_after for m in p.result.modules.values()),
             "metrics": p.evaluation.metrics if p.evaluation is not None else None, "output": outputs.get(p.rank)}
            for p in points]
    if fmt == "json":
        document: dict[str, Any] = {"kind": "resize_sweep", "source": source, "modules": len(points[0].result.modules),
                                    "parameters_before": before, "ranks": rows, "notes": adapter.notes}
        if original is not None:
            document["evaluation"] = {**_split(original), "original": original.metrics}
        return dumps_json(document, indent=2) + "\n"
    metric = _metric(points[0].evaluation) if original is not None else None
    header = ["rank", "energy kept", "rel. error", "params"] + ([metric, "val_loss"] if metric else [])
    lines = [[str(r["rank"]), f"{100 * r['energy_kept']:.4f}%", f"{r['relative_error']:.4g}", f"{r['parameters']:,}"]
             + ([f"{r['metrics'][metric]:.4f}", f"{r['metrics']['val_loss']:.4f}"] if metric else []) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"{source}: best adapter per rank, {len(points[0].result.modules)} module(s), {before:,} parameters",
           "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    if original is not None:
        out.append(f"original: {_score(original)} ({original.examples} validation examples of {original.config.data})")
    out += [f"note: {note}" for note in adapter.notes]
    out.append("energy kept Σ_m Σ_{i≤k}σᵢ² / Σ_m ‖ΔW_m‖²_F and relative error ‖ΔW−ΔW_k‖_F/‖ΔW‖_F over all modules; "
               "a module keeps min(rank, its numerical rank)")
    return "\n".join(out) + "\n"
