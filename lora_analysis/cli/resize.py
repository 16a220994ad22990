"""`lora-analysis resize` (a smaller adapter, the best of its rank) and `lora-analysis extract`
(a LoRA out of a full fine-tune): one code path, `analysis.resize.resize_adapter`, on an
adapter's ΔW or on a model pair's dense ΔW = W_ft − W₀.

Output rules: `-o OUT` (a directory in PEFT's layout, or one `.safetensors` file) is never
written over an existing adapter without `--force`, and never over an input, even with it.
stdout carries the per-module table (text or JSON); progress goes to stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraAnalysisError
from ..fileio import dumps_json
from .analyze import _emit, _examples, _load, _model_pair, _positive_int, _progress, _select, base_model_path
from .main import add_common_options

if TYPE_CHECKING:
    import torch

    from ..adapters import Adapter, Update
    from ..analysis.spectrum import BaseWeightSource
    from ..config import LoraConfig
    from ..analysis.resize import RankRule, ResizeResult

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
"""

RESIZE_EPILOG = RULES_HELP + """
examples:
  lora-analysis resize ./adapter --rank 4 -o ./adapter-r4
  lora-analysis resize kohya_lora.safetensors --energy 0.9 -o small.safetensors --format json
  lora-analysis resize ./dora-adapter --base ./base-model --sv-ratio 10 -o ./lora-r-auto
"""

EXTRACT_EPILOG = RULES_HELP + """
Only nn.Linear layers become LoRA modules (read from the model's config.json; embeddings and
GPT-2's Conv1D have other PEFT layouts and are left out, listed on stderr); --modules narrows the
choice. The models are read one module at a time.

examples:
  lora-analysis extract ./full-finetuned --base ./bert-base-uncased --rank 16 -o ./extracted
  lora-analysis extract ./full-finetuned --base ./bert-base-uncased --energy 0.9 --modules '*attention*' -o x.safetensors
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
    parser.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="output: a directory (PEFT layout) or a file ending in .safetensors")
    parser.add_argument("--force", action="store_true", help="replace an existing adapter at OUT (never an input)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="per-module table on stdout (default: text)")
    parser.add_argument("--modules", action="append", metavar="PATTERN", help="only modules whose path matches this glob (repeatable)")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda:0, ...")
    add_common_options(parser)


def run_resize(args: argparse.Namespace) -> int:
    args.base = base_model_path(args.base)
    rule = _rule(args)
    _check_output(args.output, [args.adapter, args.base], args.force)
    base = None
    if args.base:
        from ..base_weights import BaseWeights

        base = BaseWeights(args.base)
    adapter = _select(_load(args.adapter, args, base, alpha=args.alpha), args.modules, args.adapter)

    def weight(name: str, update: Update) -> torch.Tensor:  # W₀ for DoRA modules
        assert base is not None
        return base.weight(name, update.info)

    _progress(args, f"resizing {len(adapter)} module(s) of {args.adapter} ({rule.describe()})")
    return _finish(adapter, rule, args, args.adapter, base=weight if base is not None else None)


def run_extract(args: argparse.Namespace) -> int:
    from ..model_pair import is_model_checkpoint
    from ..training.model_files import linear_layers

    recorded = args.base  # in the adapter's config: "minilm", or the directory's name
    args.base = base_model_path(args.base)
    rule = _rule(args)
    _check_output(args.output, [args.finetuned, args.base], args.force)
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
    _progress(args, f"extracting {len(pair)} module(s) of {args.finetuned} against {args.base} ({rule.describe()})")
    from ..config import LoraConfig

    config = LoraConfig(base_model_name_or_path=recorded)
    return _finish(pair, rule, args, args.finetuned, config=config)


def _finish(adapter: Adapter, rule: RankRule, args: argparse.Namespace, source: str,
            base: BaseWeightSource | None = None, config: LoraConfig | None = None) -> int:
    from ..adapters import save_adapter
    from ..analysis.resize import resize_adapter
    from ..outputs import OutputError

    result = resize_adapter(adapter, rule, base=base, config=config, device=args.device, progress=not args.quiet)
    _check_output(args.output, [source, args.base], args.force)  # again: the work took a while
    try:
        written = save_adapter(result.adapter, args.output)
    except OSError as err:
        raise OutputError(args.output, f"cannot write ({err.strerror or err})") from None
    _progress(args, f"wrote {written}")
    result.notes[:0] = adapter.notes
    _emit(_render(result, source, args.format), args_without_output(args))
    return 0


def args_without_output(args: argparse.Namespace) -> argparse.Namespace:
    """The table goes to stdout: -o names the adapter here, not the report."""
    return argparse.Namespace(**{**vars(args), "output": None})


def _rule(args: argparse.Namespace) -> RankRule:
    from ..analysis.resize import RankRule

    for kind in ("rank", "energy", "sv_ratio", "fro"):
        value = getattr(args, kind)
        if value is not None:
            return RankRule(kind, float(value))
    raise LoraAnalysisError("choose one of --rank, --energy, --sv-ratio, --fro")


def _check_output(output: str, inputs: list[str | None], force: bool) -> None:
    """The output rules (`lora_analysis.outputs`): never over or into an input, an existing
    adapter replaced only with --force; a directory output may be created, not its parents."""
    from ..outputs import check_outputs

    directories = [] if Path(output).suffix == ".safetensors" else ["-o"]
    check_outputs({"-o": output}, inputs, force=force, directories=directories)


def _render(result: ResizeResult, source: str, fmt: str) -> str:
    from ..analysis.resize import resize_table

    rows = resize_table(result.modules)
    before = sum(r["parameters_before"] for r in rows)
    after = sum(r["parameters_after"] for r in rows)
    if fmt == "json":
        document = {"kind": "resize", "source": source, "rule": {"kind": result.rule.kind, "value": result.rule.value},
                    "modules": rows, "parameters_before": before, "parameters_after": after, "notes": result.notes}
        return dumps_json(document, indent=2) + "\n"
    header = ["module", "shape", "r before", "num. rank", "r", "‖ΔW‖_F", "‖ΔW−ΔW_k‖_F", "rel. error", "energy kept", "params"]
    lines = [[r["module"], "×".join(map(str, r["shape"])), "—" if r["rank_before"] is None else str(r["rank_before"]),
              str(r["numerical_rank"]), str(r["rank"]), f"{r['frobenius']:.6g}", f"{r['error']:.6g}",
              f"{r['relative_error']:.4g}", f"{100 * r['energy_kept']:.4f}%", f"{r['parameters_before']:,} → {r['parameters_after']:,}"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"{source}: {result.rule.describe()}", "  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.append(f"parameters: {before:,} → {after:,}")
    out += [f"note: {note}" for note in result.notes]
    out.append("‖ΔW−ΔW_k‖_F = √Σ_{i>k}σᵢ² (Eckart–Young: the least error of any rank-k update); energy kept Σ_{i≤k}σ²/Σσ²")
    return "\n".join(out) + "\n"
