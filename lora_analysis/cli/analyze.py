"""`lora-analysis analyze` (what is in one adapter) and `lora-analysis compare` (φ between two).

Start-up stays lean: this module imports only the standard library and torch-free tables;
the analysis (torch), the report renderers and matplotlib (HTML, --plot) are imported when a
command runs and needs them.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
from typing import TYPE_CHECKING

from ..config import BASIS_KINDS
from ..errors import LoraAnalysisError, shown
from .main import add_common_options, add_device_option, add_force_option, add_svd_option

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..base_weights import BaseWeights

REPORT_FORMATS = ("text", "markdown", "json", "html")
COMPARE_FORMATS = ("text", "markdown", "json")

ANALYZE_EPILOG = """\
Metrics of ΔW are computed exactly from each module's factors, never by forming the d×k
matrix: LoRA's s·B·A (QR + r×r SVD), and likewise AdaLoRA, Tucker LoCon and LoHa (Khatri–Rao
factors), LoKr (σ = products of the Kronecker factors' σ); DoRA and loralib convs are formed
and decomposed exactly, one module at a time. DoRA's ΔW needs the base weights. With base
weights (--base, or the adapter's recorded base_model_name_or_path when it names a built-in
model or a local directory), each module is also compared with its pretrained W (paper
Table 7 and Figure 8, intruder dimensions); W's SVD is cached on disk. Formats read: PEFT
(LoRA, AdaLoRA, LoHa, LoKr, DoRA), diffusers, kohya, LyCORIS, loralib, torchtune, LitGPT,
AdapterHub.

examples:
  lora-analysis analyze adapter_model.safetensors
  lora-analysis analyze ./peft-adapter-dir --modules '*query' --modules '*value' --top 10
  lora-analysis analyze kohya_lora.safetensors --tau 0.8 0.95 --format markdown
  lora-analysis analyze ./adapter --format json -o report.json
  lora-analysis analyze ./adapter --base ./bert-base-uncased --format html -o report.html
  lora-analysis analyze ./full-finetuned-model --base ./bert-base-uncased   # full fine-tuning: ΔW = W_ft − W₀

A model directory (or a model's .safetensors file) instead of an adapter, with --base, is a
full fine-tune: every 2-D weight's ΔW = W_ft − W₀ (or those --modules selects) is analysed as
a dense update, the two models read one module at a time. --svd chooses its SVD: exact
(LAPACK, float64), randomized, or auto (default: exact below 2048 on the short side, else a
randomized SVD whose sketch grows until ‖(I − QQᵀ)ΔW‖_F ≤ 1% of ‖ΔW‖_F, exact where that would
not pay). A randomized SVD states per module its sketch and residual; every σᵢ is reported
with a deterministic interval [σᵢ(B), √(σᵢ(B)² + residual²)], metrics it does not pin down as
intervals (or null, with the reason, in JSON), and the comparisons with W, which need exact
singular vectors, are skipped for such modules (noted).
  lora-analysis analyze runs/r8 --base minilm        # the built-in model (found anyway when the adapter records it)
"""

COMPARE_EPILOG = """\
φ(i, j) = ‖U_iᵀ V_j‖²_F / min(i, j) between the top-i directions of a module in ADAPTER_A
and the top-j of the same module in ADAPTER_B (paper Eq. 4; 1 = same subspace, chance
level max(i, j)/d). Modules are matched by path (PEFT's base_model.model. and similar
prefixes ignored); modules found in one adapter only are listed.

examples:
  lora-analysis compare rank8/adapter_model.safetensors rank64/adapter_model.safetensors
  lora-analysis compare seed1/ seed2/ --basis dW-left --top-k 4 --plot phi.pdf
  lora-analysis compare a.safetensors b.safetensors --modules '*layer.11*' --format json -o phi.json
  lora-analysis compare ./full-finetuned ./lora-run --base ./bert-base-uncased   # does LoRA find full FT's directions?

A fine-tuned model on either side (with --base) stands for its ΔW = W_ft − W₀ (kind dense,
compared in ΔW's singular vectors, dW-right unless --basis says otherwise), always from the exact
SVD (φ needs exact singular vectors; a randomized SVD bounds the singular values only).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    analyze = subparsers.add_parser(
        "analyze", help="rank analysis of one adapter (tables, JSON, HTML)",
        description="Rank analysis of a LoRA adapter: per-module spectrum of ΔW, effective ranks, "
                    "rank recommendation, and (with --base) ΔW against the pretrained weights.",
        epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("adapter", metavar="ADAPTER",
                         help="adapter file (.safetensors, .bin, .pt, .pth) or directory; or a fine-tuned model (with --base)")
    base = analyze.add_mutually_exclusive_group()
    base.add_argument("--base", metavar="MODEL",
                      help="pretrained weights: built-in name (minilm), Hugging Face model directory or .safetensors "
                           "file (default: the adapter's base_model_name_or_path when it names a built-in model or "
                           "a local directory)")
    base.add_argument("--no-base", action="store_true", help="skip the comparison with the pretrained weights")
    analyze.add_argument("--format", choices=REPORT_FORMATS, default="text", help="report format (default: text)")
    analyze.add_argument("-o", "--output", metavar="FILE",
                         help="write the report to FILE (atomically) instead of stdout; FILE's folder must exist")
    _add_module_filter(analyze)
    analyze.add_argument("--top", type=_positive_int, metavar="N",
                         help="list only the N modules with the largest ‖ΔW‖_F (summaries still cover all)")
    analyze.add_argument("--tau", type=_fraction, nargs="+", default=[0.9, 0.99], metavar="TAU",
                         help="energy thresholds for the energy rank and the rank recommendation (default: 0.9 0.99)")
    analyze.add_argument("--alpha", type=_finite_float, metavar="ALPHA",
                         help="LoRA alpha to assume where the file does not record it (else scale is reported unknown)")
    _add_dora_direction(analyze)
    analyze.add_argument("--weight-k", type=_positive_int, default=64, metavar="K",
                         help="with --base: top-K singular vectors of W for φ against W (default: 64)")
    intruders = analyze.add_mutually_exclusive_group()
    intruders.add_argument("--intruders", dest="intruders", action="store_const", const=True, default=None,
                           help="with --base: intruder dimensions for every module (they need W's full SVD: about "
                                "a minute per 4096×4096 weight the first time, then cached); default: only where "
                                "min(d_out, d_in) ≤ 1536")
    intruders.add_argument("--no-intruders", dest="intruders", action="store_const", const=False,
                           help="with --base: skip intruder dimensions")
    analyze.add_argument("--intruder-k", type=_positive_int, default=10, metavar="K",
                         help="top-K singular vectors of W + ΔW checked for intruders (default: 10)")
    analyze.add_argument("--intruder-epsilon", type=_fraction, default=0.5, metavar="EPS",
                         help="intruder if max |cos| with W's singular vectors is below EPS (default: 0.5)")
    add_device_option(analyze)
    add_svd_option(analyze)
    add_force_option(analyze)
    add_common_options(analyze)
    analyze.set_defaults(func=run_analyze)

    compare = subparsers.add_parser(
        "compare", help="subspace similarity φ between two adapters, module by module",
        description="Subspace similarity φ (LoRA paper, Eq. 4) between two adapters of different "
                    "ranks or seeds, module by module, with chance levels and principal angles.",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("adapter_a", metavar="ADAPTER_A")
    compare.add_argument("adapter_b", metavar="ADAPTER_B")
    compare.add_argument("--basis", choices=BASIS_KINDS, default=None,
                         help="A: right-singular vectors of A (paper default); B: left of B; "
                              "dW-left / dW-right: of ΔW (default: A, and dW-right for pairs whose update "
                              "kind has no factor A, e.g. LoHa, LoKr, DoRA, each pair labelled)")
    compare.add_argument("--base", metavar="MODEL",
                         help="base model of a fully fine-tuned model given on either side (its ΔW = W_ft − W₀ is compared)")
    compare.add_argument("--format", choices=COMPARE_FORMATS, default="text", help="report format (default: text)")
    compare.add_argument("-o", "--output", metavar="FILE",
                         help="write the report to FILE (atomically) instead of stdout; FILE's folder must exist")
    compare.add_argument("--plot", metavar="FILE",
                         help="φ heatmaps (paper Figures 3/4) to FILE; format by extension: .png, .pdf, .svg")
    compare.add_argument("--top-k", type=_positive_int, metavar="K",
                         help="k of the mean over the top-k diagonal φ(i, i) (default: the smaller numerical rank)")
    _add_module_filter(compare)
    _add_dora_direction(compare)
    add_device_option(compare)
    add_force_option(compare)
    add_common_options(compare)
    compare.set_defaults(func=run_compare)


def run_analyze(args: argparse.Namespace) -> int:
    from ..analysis import AnalysisOptions, analyze_adapter
    from ..base_weights import BaseWeights
    from ..report import analyze_report, render_report

    args.base = base_model_path(args.base)
    _check_outputs(args, {"-o": args.output}, [args.adapter, args.base])
    base = BaseWeights(args.base) if args.base else None
    pair = _model_pair(args.adapter, args.base, args.modules)
    if pair is not None:
        adapter = selected = pair
    else:
        adapter = _load(args.adapter, args, base, alpha=args.alpha, dora_needs_base=False)
        if base is None and not args.no_base:
            source = _recorded_base(adapter, args)
            if source:
                base = BaseWeights(source)
                adapter = _load(args.adapter, args, base, alpha=args.alpha)  # formats that tell layers apart by W's shapes
        if base is None:
            _refuse_dora_without_base(adapter, args.adapter)
        selected = _select(adapter, args.modules, args.adapter)
    base_names = None
    if base is not None:  # fail before the long work
        infos = {name: selected.info(name) for name in selected}
        base_names = {name: base.resolve(name, i.component, i.storage.weight_suffix) for name, i in infos.items()}
    _progress(args, f"analyzing {len(selected)} module(s) of {args.adapter}")
    options = AnalysisOptions(
        taus=sorted(set(args.tau)), weight_k=args.weight_k, intruders=args.intruders, intruder_k=args.intruder_k,
        intruder_epsilon=args.intruder_epsilon, device=args.device, keep_vectors=False, svd=args.svd,
    )
    analysis = analyze_adapter(selected, base, options, progress=not args.quiet)
    report = analyze_report(
        analysis, selected, num_modules=len(adapter), base_names=base_names, patterns=args.modules, top=args.top,
    )
    if args.format == "html":
        _progress(args, "rendering figures")
    _emit(render_report(report, args.format), args)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..analysis import adapter_notes, adapter_spectra, compare_adapters, match_module_names
    from ..report import compare_report, render_report

    args.base = base_model_path(args.base)
    if args.plot:
        from ..plots import figure_format

        figure_format(args.plot)  # a bad extension fails before the work
    _check_outputs(args, {"-o": args.output, "--plot": args.plot}, [args.adapter_a, args.adapter_b, args.base])
    adapter_a, adapter_b = (_model_pair(path, args.base, args.modules) or _select(_load(path, args), args.modules, path)
                            for path in (args.adapter_a, args.adapter_b))
    match_module_names(list(adapter_a.modules), list(adapter_b.modules), (args.adapter_a, args.adapter_b))  # before the work
    # exact: φ needs ΔW's singular vectors, which a randomized SVD's bound does not cover
    spectra_a, spectra_b = (adapter_spectra(x, progress=not args.quiet, device=args.device, svd="exact")
                            for x in (adapter_a, adapter_b))
    comparison = compare_adapters(spectra_a, spectra_b, basis=args.basis or "A", top_k=args.top_k,
                                  fallback=args.basis is None, sources=(args.adapter_a, args.adapter_b))
    notes = [f"{label}: {note}" for label, x in (("A", adapter_a), ("B", adapter_b)) for note in adapter_notes(x)]
    report = compare_report(comparison, adapter_a, adapter_b, top_k=args.top_k, patterns=args.modules, notes=notes)
    if not report["pairs"]:
        raise LoraAnalysisError(f"{shown(args.adapter_a)} and {shown(args.adapter_b)}: no module in common "
                                f"(A has e.g. {_examples(report['only_in_a'])}; B has e.g. {_examples(report['only_in_b'])})")
    if args.plot:
        from ..plots import figure_bytes, figure_format
        from ..report.figures import compare_figure

        _write(args.plot, figure_bytes(compare_figure(report), figure_format(args.plot)), args)
    _emit(render_report(report, args.format), args)
    return 0


def _recorded_base(adapter: Adapter, args: argparse.Namespace) -> str | None:
    """The adapter's own base model when its config names a built-in or a local directory (said on stderr)."""
    from ..base_weights import recorded_base

    source = recorded_base(adapter)
    if source:
        _progress(args, f"base weights: {source} (the adapter's base_model_name_or_path; --no-base skips them)")
    return source


def _load(path: str, args: argparse.Namespace, base: BaseWeights | None = None, alpha: float | None = None,
          dora_needs_base: bool = True) -> Adapter:
    """The adapter at `path`, its modules streamed from the file (`base`'s shapes tell loralib
    convs and PEFT target_parameters apart); DoRA modules need base weights or --dora-direction
    (refused here, before any work, unless `dora_needs_base` is False)."""
    from ..adapters import load_adapter

    adapter = load_adapter(path, alpha=alpha, lazy=True, weight_shapes=base.tensor_shapes if base else None)
    if args.dora_direction:
        return adapter.dora_directions()
    if dora_needs_base and base is None:
        _refuse_dora_without_base(adapter, path)
    return adapter


def _refuse_dora_without_base(adapter: Adapter, path: str) -> None:
    dora = [name for name in adapter.modules if adapter.info(name).kind == "dora"]
    if dora:
        raise LoraAnalysisError(
            f"{shown(path)}: {len(dora)} DoRA module(s) (e.g. {shown(dora[0])}): ΔW = diag(m/‖W₀ + sBA‖)(W₀ + sBA) − W₀ needs the "
            "base weights (--base, analyze only); --dora-direction analyses the direction update s·B·A alone instead")


def base_model_path(base: str | None) -> str | None:
    """--base as a path: a built-in model's name (`minilm`, as `train --model` takes it) is
    its installed directory. Without --base nothing is imported (analyze stays lean)."""
    if base is None:
        return None
    from ..base_weights import model_path

    return os.fspath(model_path(base))


def _model_pair(path: str, base: str | None, patterns: list[str] | None) -> Adapter | None:
    """The dense ΔW = W_ft − W₀ of a fine-tuned model at `path` against `base` (streamed), or
    None when `path` is an adapter. A model without --base is refused."""
    from ..model_pair import ModelPair, is_model_checkpoint

    if not is_model_checkpoint(path):
        return None
    if not base:
        raise LoraAnalysisError(f"{path}: a model, not an adapter: its full fine-tuning ΔW = W_ft − W₀ needs the base "
                                "model (--base BASE_MODEL)")
    return ModelPair(path, base, patterns).adapter()


def _select(adapter: Adapter, patterns: list[str] | None, path: str) -> Adapter:
    """The adapter restricted to modules whose path matches any glob pattern (all if None)."""
    if not patterns:
        return adapter
    names = [n for n in adapter.modules if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise LoraAnalysisError(f"{path}: no module matches {' or '.join(patterns)} "
                                f"(modules are e.g. {_examples(list(adapter.modules))})")
    return adapter.select(names)


def _emit(text: str, args: argparse.Namespace) -> None:
    """The report to -o FILE (atomic write) or stdout; stdout carries nothing else."""
    if args.output:
        _write(args.output, text, args)
        return
    try:  # UTF-8 whatever the locale: reports contain σ, α, ‖ΔW‖
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # `| head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _check_outputs(args: argparse.Namespace, outputs: dict[str, str | None], inputs: list[str | None]) -> None:
    """The output rules (`lora_analysis.outputs`), checked before any work."""
    from ..outputs import check_outputs

    check_outputs(outputs, inputs, force=args.force)


def _write(path: str, data: str | bytes, args: argparse.Namespace) -> None:
    """One output file, atomically, by the output rules; an unwritable path is bad input (exit 2)."""
    from ..outputs import OutputError, write_output

    try:
        write_output(path, data, force=args.force)
    except OSError as err:
        raise OutputError(path, f"cannot write ({err.strerror or err})") from None
    _progress(args, f"wrote {shown(path)}")


def _progress(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"lora-analysis: {message}", file=sys.stderr)


def _examples(names: list[str], n: int = 3) -> str:
    """A few names for a message (escaped and cut short: they come from files)."""
    return ", ".join(shown(name, 60) for name in names[:n]) + (", ..." if len(names) > n else "") if names else "none"


def _add_dora_direction(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dora-direction", action="store_true",
                        help="analyse DoRA modules as their direction update s·B·A alone (magnitudes ignored; every "
                             "output says so) instead of refusing them without base weights")


def _add_module_filter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modules", action="append", metavar="PATTERN",
                        help="only modules whose path matches this glob, e.g. '*.query' or '*layer.1[01].*' (repeatable)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
