"""`lora-analysis extract` and `analyze FT --base` on a full fine-tune of MiniLM, and its resize curve.

    lora-analysis train --model minilm --data rotten_tomatoes --method full --steps 150 \\
        --eval-every 150 --output-dir benchmarks/_data/minilm_full --quiet
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py [--finetuned benchmarks/_data/minilm_full] [--repeat 3]

Each command runs `--repeat` times in a fresh process (`python -m lora_analysis ...`, start-up
included); reported: best and median wall time, CPU time and peak RSS (`ru_maxrss` of the child).

- analyze: `analyze FT --base MINILM --format json` — every 2-D weight's ΔW = W_ft − W₀ (the
  embeddings too), exact float64 SVD, and with --base the analyses against W;
- extract: `extract FT --base MINILM --rank 16 -o OUT` — the 36 encoder Linear layers + pooler.

Then the resize curve, by the product itself: `extract FT --base BASE
--sweep-ranks RANKS --eval --format json` — per rank k of --ranks, over the Linear layers: energy
kept Σ_{i≤k}σ² / Σσ², relative error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F, the adapter's parameters and its
validation accuracy (the extracted LoRA plus the fine-tuned head on the base model, on the run's
own validation split).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import measure  # noqa: E402

HERE = Path(__file__).resolve().parent


def curve(finetuned: Path, base: Path, ranks: list[int], evaluated: bool) -> dict:
    """The product's rank curve, in a child process: `extract FT --base BASE --sweep-ranks RANKS
    [--eval] --format json` (its JSON document: per rank energy kept, relative error, parameters
    and validation metrics of the extracted LoRA plus the fine-tuned head; the original's)."""
    import json
    import subprocess

    command = [sys.executable, "-m", "lora_analysis", "extract", str(finetuned), "--base", str(base), "--sweep-ranks",
               *map(str, ranks), "--format", "json", "--quiet", *(["--eval"] if evaluated else [])]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"extract failed: {' '.join(command)}")
    return json.loads(done.stdout)


def main() -> None:
    from lora_analysis.assets import asset_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", type=Path, default=HERE / "_data" / "minilm_full")
    parser.add_argument("--base", type=Path, default=None, help="default: the built-in MiniLM")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--no-eval", action="store_true", help="energy and error only (no validation accuracy)")
    parser.add_argument("--skip-timing", action="store_true", help="only the curve")
    args = parser.parse_args()
    base = args.base or asset_path("minilm")
    if not args.skip_timing:
        timing(args.finetuned, base, args.repeat)
    document = curve(args.finetuned, base, args.ranks, not args.no_eval)
    original = document.get("evaluation", {}).get("original", {}).get("val_accuracy")
    print(f"\nfine-tuned model's own validation accuracy: {original}")
    print("\n| rank | energy kept | relative error ‖ΔW−ΔW_k‖/‖ΔW‖ | LoRA parameters | val. accuracy (LoRA + head) |")
    print("|---|---|---|---|---|")
    for row in document["ranks"]:
        accuracy = "" if row["metrics"] is None else f"{row['metrics']['val_accuracy']:.4f}"
        print(f"| {row['rank']} | {100 * row['energy_kept']:.2f} % | {row['relative_error']:.4f} | "
              f"{row['parameters']:,} | {accuracy} |")


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
