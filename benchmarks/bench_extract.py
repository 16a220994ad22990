"""`lora-analysis extract` and `analyze FT --base` on a full fine-tune of MiniLM, and its resize curve.

    lora-analysis train --model minilm --data rotten_tomatoes --method full --steps 150 \\
        --eval-every 150 --output-dir benchmarks/_data/minilm_full --quiet
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py [--finetuned benchmarks/_data/minilm_full] [--repeat 3]

Each command runs `--repeat` times in a fresh process (`python -m lora_analysis ...`, start-up
included); reported: best and median wall time, CPU time and peak RSS (`ru_maxrss` of the child).

- analyze: `analyze FT --base MINILM --format json` — every 2-D weight's ΔW = W_ft − W₀ (the
  embeddings too), exact float64 SVD, and with --base the analyses against W;
- extract: `extract FT --base MINILM --rank 16 -o OUT` — the 36 encoder Linear layers + pooler.

Then the resize curve, in this process: `resize_adapter` of the pair's Linear-layer ΔW at each
rank of --ranks, summed over the modules: energy kept Σ_{i≤k}σ² / Σσ², relative error
‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (both over all modules), and the adapter's parameters.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import measure  # noqa: E402

HERE = Path(__file__).resolve().parent


def curve(finetuned: Path, base: Path, ranks: list[int], evaluate_ranks: list[int]) -> list[tuple]:
    """(rank, energy kept, relative error, parameters, validation accuracy or None) over the
    Linear layers, per rank. Accuracy (ranks in `evaluate_ranks`): the extracted LoRA plus the
    fine-tuned classification head on the base model, on the run's own validation split."""
    from safetensors.torch import load_file

    from lora_analysis import Adapter, LoraConfig
    from lora_analysis.analysis import RankRule, resize_adapter
    from lora_analysis.model_pair import ModelPair
    from lora_analysis.naming import strip_known_prefixes
    from lora_analysis.training import evaluate
    from lora_analysis.training.evaluation import run_config
    from lora_analysis.training.model_files import linear_layers

    linear = {strip_known_prefixes(n) for n in linear_layers(finetuned) or ()}
    adapter = ModelPair(finetuned, base).adapter()
    adapter = adapter.select([n for n in adapter.modules if strip_known_prefixes(n) in linear])
    head = {k: v for shard in sorted(finetuned.glob("*.safetensors")) for k, v in load_file(shard).items()
            if k.startswith("classifier.")}
    recipe = run_config(finetuned)
    rows = []
    for k in ranks:
        result = resize_adapter(adapter, RankRule("rank", k), device="cpu", progress=False)
        total = sum(m.frobenius**2 for m in result.modules.values())
        error = sum(m.error**2 for m in result.modules.values())
        accuracy = None
        if k in evaluate_ranks and recipe is not None:
            with_head = Adapter(result.adapter.modules, LoraConfig(modules_to_save=["classifier"], task_type="SEQ_CLS"), head)
            accuracy = evaluate(with_head, recipe, base=base, progress=False).accuracy
        rows.append((k, 1 - error / total, math.sqrt(error / total),
                     sum(m.parameters_after for m in result.modules.values()), accuracy))
    return rows


def main() -> None:
    from lora_analysis.assets import asset_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", type=Path, default=HERE / "_data" / "minilm_full")
    parser.add_argument("--base", type=Path, default=None, help="default: the built-in MiniLM")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--eval-ranks", type=int, nargs="*", default=[1, 4, 16, 64, 256],
                        help="ranks whose extracted adapter is also evaluated (validation accuracy)")
    parser.add_argument("--skip-timing", action="store_true", help="only the curve")
    args = parser.parse_args()
    base = args.base or asset_path("minilm")
    if not args.skip_timing:
        timing(args.finetuned, base, args.repeat)
    recipe_accuracy = _run_accuracy(args.finetuned)
    print(f"\nfine-tuned model's own validation accuracy: {recipe_accuracy}")
    print("\n| rank | energy kept | relative error ‖ΔW−ΔW_k‖/‖ΔW‖ | LoRA parameters | val. accuracy (LoRA + head) |")
    print("|---|---|---|---|---|")
    for k, kept, error, parameters, accuracy in curve(args.finetuned, base, args.ranks, args.eval_ranks):
        shown = "" if accuracy is None else f"{accuracy:.4f}"
        print(f"| {k} | {100 * kept:.2f} % | {error:.4f} | {parameters:,} | {shown} |")


def _run_accuracy(finetuned: Path) -> float | None:
    import json

    metrics = finetuned / "metrics.json"
    return json.loads(metrics.read_text())["final"].get("val_accuracy") if metrics.exists() else None


def timing(finetuned: Path, base: Path, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "analyze": [sys.executable, "-m", "lora_analysis", "analyze", str(finetuned), "--base", str(base),
                        "--format", "json", "-o", str(Path(tmp) / "report.json"), "--quiet"],
            "extract": [sys.executable, "-m", "lora_analysis", "extract", str(finetuned), "--base", str(base),
                        "--rank", "16", "-o", str(Path(tmp) / "extracted"), "--force", "--quiet"],
        }
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        for _ in range(repeat):
            for name, command in commands.items():
                runs[name].append(measure(command))
    print(f"{finetuned} against {base}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| command | wall best | wall median | CPU median | peak RSS |\n|---|---|---|---|---|")
    for name, results in runs.items():
        walls, cpus, peaks = zip(*results)
        print(f"| {name} | {min(walls):.2f} s | {statistics.median(walls):.2f} s | {statistics.median(cpus):.2f} s | "
              f"{max(peaks):.0f} MB |")


if __name__ == "__main__":
    main()
