"""`analyze FT --base` and `extract` on a Llama-7B-shaped synthetic pair of checkpoints, exact vs
randomized SVD, with the bound the randomized SVD reaches.

    python benchmarks/bench_7b_pair.py [--layers 1] [--out benchmarks/_data/llama7b_pair] [--exact-modules '*q_proj*']

The pair: `--layers` decoder layers at the exact Llama-7B shapes (q, k, v, o: 4096 × 4096; gate,
up: 11008 × 4096; down: 4096 × 11008), bf16 on disk, two safetensors shards per checkpoint with
their index and a LlamaForCausalLM config.json (embeddings, norms and lm_head left out: per-layer
numbers extrapolate ×32). W₀ ~ N(0, 0.02²); the fine-tune is bf16(W₀ + ΔW) with a planted ΔW of
rank 16 (σ from 8 down to 1) plus N(0, 1e-4²) noise — and the bf16 rounding of W_ft, a full-rank
floor of its own, as in a real bf16 fine-tune.

Each command runs once in a fresh process (`python -m lora_analysis …`, start-up included):
wall time, CPU time, peak RSS (`ru_maxrss` of the child). `--svd auto` is not run: on this pair
its sketch cannot reach 1 % (the N(0, 1e-4²) noise and bf16's rounding of W_ft are a flat floor
of about 3.6 % of ‖ΔW‖_F), so auto takes the exact route, whose cost the exact rows give. The exact route on a whole 7B layer
takes far longer than this 2-core machine allows a benchmark: it is timed on the modules that
`--exact-modules` selects (default: one 4096 × 4096 and one 11008 × 4096), and the per-layer
figure extrapolated from them (4 + 3 modules of those shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import measure  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
          "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
          "mlp.down_proj": (4096, 11008)}
PLANTED_RANK = 16


def write_pair(out: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """base/ and ft/ under `out` (skipped when both exist): sharded bf16 safetensors + index + config."""
    base_dir, ft_dir = out / "base", out / "ft"
    if (base_dir / "model.safetensors.index.json").exists() and (ft_dir / "model.safetensors.index.json").exists():
        return ft_dir, base_dir
    g = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, dict[str, torch.Tensor]]] = {"base": {}, "ft": {}}
    for layer in range(layers):
        for module, (m, n) in SHAPES.items():
            shard = f"model-{1 + (module.startswith('mlp')):05d}-of-00002.safetensors"
            key = f"model.layers.{layer}.{module}.weight"
            W0 = 0.02 * torch.randn(m, n, generator=g)
            U = torch.linalg.qr(torch.randn(m, PLANTED_RANK, generator=g))[0]
            V = torch.linalg.qr(torch.randn(n, PLANTED_RANK, generator=g))[0]
            sigma = torch.linspace(8.0, 1.0, PLANTED_RANK)
            delta = (U * sigma) @ V.T + 1e-4 * torch.randn(m, n, generator=g)
            shards["base"].setdefault(shard, {})[key] = W0.bfloat16()
            shards["ft"].setdefault(shard, {})[key] = (W0 + delta).bfloat16()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    for name, directory in (("base", base_dir), ("ft", ft_dir)):
        directory.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for shard, tensors in shards[name].items():
            save_file(tensors, directory / shard, metadata={"format": "pt"})
            weight_map.update({key: shard for key in tensors})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (directory / "config.json").write_text(json.dumps(config))
    return ft_dir, base_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "_data" / "llama7b_pair")
    parser.add_argument("--exact-modules", nargs="+", default=["*layers.0.self_attn.q_proj", "*layers.0.mlp.up_proj"],
                        help="modules timed on the exact route (each alone)")
    parser.add_argument("--skip-exact", action="store_true", help="the randomized runs only")
    args = parser.parse_args()
    ft, base = write_pair(args.out, args.layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(label: str, command: list[str], report: Path | None = None) -> None:
            wall, cpu, peak = measure([sys.executable, "-m", "lora_analysis", *command, "--quiet"])
            bound = ""
            if report is not None and report.exists():
                modules = json.loads(report.read_text())["modules"]
                worst = max((m["svd"]["relative_residual"] for m in modules.values()), default=0.0)
                sketches = sorted({m["svd"]["sketch"] for m in modules.values()}, key=str)
                bound = f"max ‖E‖_F/‖ΔW‖_F {worst:.2e}, sketch {sketches}"
            rows.append((label, wall, cpu, peak, bound))
            print(rows[-1], flush=True)

        out = Path(tmp) / "randomized.json"
        run(f"analyze --svd randomized ({len(SHAPES) * args.layers} modules)",
            ["analyze", str(ft), "--base", str(base), "--svd", "randomized", "--format", "json", "-o", str(out)], out)
        run(f"extract --rank 16 --svd randomized ({len(SHAPES) * args.layers} modules)",
            ["extract", str(ft), "--base", str(base), "--rank", "16", "--svd", "randomized", "-o", str(Path(tmp) / "x"),
             "--format", "json"])
        if not args.skip_exact:
            for pattern in args.exact_modules:
                out = Path(tmp) / "exact.json"
                run(f"analyze --svd exact --modules {pattern}",
                    ["analyze", str(ft), "--base", str(base), "--svd", "exact", "--modules", pattern, "--format", "json",
                     "-o", str(out), "--force"], out)
                run(f"extract --rank 16 --svd exact --modules {pattern}",
                    ["extract", str(ft), "--base", str(base), "--rank", "16", "--svd", "exact", "--modules", pattern,
                     "-o", str(Path(tmp) / "xe"), "--force", "--format", "json"])
    print(f"\n{ft} against {base}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| command | wall | CPU | peak RSS | bound |\n|---|---|---|---|---|")
    for label, wall, cpu, peak, bound in rows:
        print(f"| {label} | {wall:.1f} s | {cpu:.1f} s | {peak:.0f} MB | {bound} |")


if __name__ == "__main__":
    main()
