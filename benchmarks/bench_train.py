"""Training benchmarks on the built-in MiniLM (CPU by default; see benchmarks/README.md).

    python benchmarks/bench_train.py speed      # train step: our LoRA core vs PEFT, same config
    python benchmarks/bench_train.py memory     # peak RSS and trainable params: LoRA vs full FT
    python benchmarks/bench_train.py latency    # inference: merged LoRA vs base vs unmerged
    python benchmarks/bench_train.py quality    # default recipe on Rotten Tomatoes (--method full: full FT)
    python benchmarks/bench_train.py steps      # train step: LoRA (our core) vs full fine-tuning
    python benchmarks/bench_train.py ranks      # accuracy vs r for {query} and {query,value}

Speed and latency alternate the contenders step by step inside one process, so machine load
hits both alike; they report medians. Memory runs each variant in a fresh child process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_analysis import LoraConfig, TrainConfig, inject_lora, merge_lora, run_sweep, train  # noqa: E402
from lora_analysis.training.data import load_dataset  # noqa: E402
from lora_analysis.training.models import load_model  # noqa: E402

BATCH, SEQ, R, TARGETS = 16, 64, 8, ["query", "value"]


def fixed_batch(tokenizer) -> dict[str, torch.Tensor]:
    """16 real reviews padded/truncated to exactly 64 tokens, with labels."""
    data = load_dataset("rotten_tomatoes")
    enc = tokenizer(data.texts[:BATCH], padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(data.labels[:BATCH])}


def minilm():
    torch.manual_seed(0)
    return load_model("minilm", "classification", ["rotten", "fresh"])[:2]


def ours():
    model, tokenizer = minilm()
    inject_lora(model, LoraConfig(r=R, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"]), seed=0)
    return model, tokenizer


def peft_model():
    import peft

    model, tokenizer = minilm()
    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS", modules_to_save=["classifier"])
    return peft.get_peft_model(model, config), tokenizer


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stepper(model, batch):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def bench_speed(args) -> dict:
    (a, tokenizer), (b, _) = ours(), peft_model()
    batch = fixed_batch(tokenizer)
    steps = {"ours": stepper(a, batch), "peft": stepper(b, batch)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name in (("ours", "peft") if i % 2 == 0 else ("peft", "ours")):
            t = steps[name]()
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "train_step_median_s": med,
        "ratio_ours_over_peft": med["ours"] / med["peft"],
        "trainable_params": {"ours": trainable(a), "peft": trainable(b)},
        "steps_each": args.steps,
    }


def bench_steps(args) -> dict:
    """Time per training step, LoRA r = 8 (query,value + head) vs full fine-tuning, alternating."""
    (a, tokenizer), (b, _) = ours(), minilm()
    batch = fixed_batch(tokenizer)
    steps = {"lora": stepper(a, batch), "full": stepper(b, batch)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name in (("lora", "full") if i % 2 == 0 else ("full", "lora")):
            t = steps[name]()
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"train_step_median_s": med, "ratio_full_over_lora": med["full"] / med["lora"],
            "trainable_params": {"lora": trainable(a), "full": trainable(b)}, "steps_each": args.steps}


def bench_memory(args) -> dict:
    out = {}
    for variant in ("lora", "full"):
        proc = subprocess.run([sys.executable, __file__, "_memory_child", variant, "--steps", str(args.memory_steps)],
                              capture_output=True, text=True, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_peak_rss_lora_over_full"] = out["lora"]["peak_rss_mb"] / out["full"]["peak_rss_mb"]
    out["ratio_trainable_lora_over_full"] = out["lora"]["trainable_params"] / out["full"]["trainable_params"]
    return out


def memory_child(variant: str, steps: int) -> None:
    model, tokenizer = ours() if variant == "lora" else minilm()
    batch = fixed_batch(tokenizer)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = stepper(model, batch)
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"trainable_params": trainable(model), "peak_rss_mb": peak, "rss_after_load_mb": loaded,
                      "training_overhead_mb": peak - loaded}))


def bench_latency(args) -> dict:
    base, tokenizer = minilm()
    merged, _ = ours()
    unmerged, _ = ours()
    for model in (merged, unmerged):  # a trained-looking ΔW (B ≠ 0) so merging changes weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    merge_lora(merged)
    batch = {k: v for k, v in fixed_batch(tokenizer).items() if k != "labels"}
    models = {"base": base.eval(), "merged": merged.eval(), "unmerged": unmerged.eval()}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            order = list(models) if i % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                models[name](**batch)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]) for k, v in times.items()}
    return {"forward_median_s": med, "forward_iqr_s": spread, "ratio_merged_over_base": med["merged"] / med["base"],
            "ratio_unmerged_over_base": med["unmerged"] / med["base"]}


def bench_quality(args) -> dict:
    start = time.perf_counter()
    config = TrainConfig(steps=args.train_steps, seed=args.seeds[0], eval_every=args.eval_every or args.train_steps,
                         method=args.method, lr=args.lr, progress=not args.quiet)
    result = train(config)
    return {"method": args.method, "lr": config.learning_rate, "steps": args.train_steps, "seed": args.seeds[0],
            "evals": result.metrics["evals"], "train_loop_s": result.metrics["wall_time_s"],
            "s_per_step": result.metrics["wall_time_s"] / args.train_steps, "total_s": time.perf_counter() - start}


def bench_ranks(args) -> dict:
    base = TrainConfig(steps=args.train_steps, progress=not args.quiet)
    result = run_sweep(base, args.run_dir, ranks=[1, 2, 4, 8, 64], seeds=args.seeds, target_sets=[["query"], ["query", "value"]])
    return {name: {"r": c["r"], "seed": c["seed"], "targets": c["targets"], "val_accuracy": c["final"]["val_accuracy"],
                   "wall_time_s": c["wall_time_s"]} for name, c in result.manifest["cells"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "steps", "memory", "latency", "quality", "ranks", "_memory_child"])
    parser.add_argument("variant", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per contender (speed, latency)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=200, help="quality / ranks: training steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--method", choices=["lora", "full"], default="lora", help="quality: LoRA or full fine-tuning")
    parser.add_argument("--lr", type=float, help="quality: peak learning rate (default: the method's)")
    parser.add_argument("--eval-every", type=int, default=0, help="quality: validate every N steps (default: at the end)")
    parser.add_argument("--run-dir", default="runs/bench_ranks")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.what == "_memory_child":
        memory_child(args.variant, args.memory_steps)
        return
    bench = {"speed": bench_speed, "steps": bench_steps, "memory": bench_memory, "latency": bench_latency, "quality": bench_quality, "ranks": bench_ranks}
    result = bench[args.what](args)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
