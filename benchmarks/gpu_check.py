"""The GPU path, checked in one command (a few minutes on a GPU machine):

    python benchmarks/gpu_check.py [--data benchmarks/_data] [--only train ddp analyze 7b reproduce]

1. train step: one forward + backward of MiniLM + LoRA (r = 8, query,value; batch 16 × 64
   tokens of Rotten Tomatoes) under bf16 autocast against the same step in fp32, on CUDA
   (loss within 1 % relative, cosine of all trainable gradients ≥ 0.9: bf16 keeps 8 bits, and
   the small LoRA gradients of early layers come out noisy, cosines 0.1–0.9 per tensor on the
   CPU); CUDA fp32 against CPU fp32 (loss within 1e-4 relative, gradients' cosine ≥ 0.9999).
   Then 2 real trainer steps (`train`) on CUDA.
2. DDP: a 2-step `torchrun --nproc_per_node 2 ... train --device cuda` (NCCL) when ≥ 2 GPUs are
   visible: exit 0, world_size 2 recorded, finite losses.
3. analyze: `analyze_adapter` of a synthetic adapter (fp16 / bf16 / fp32 factors, full-rank and
   rank-deficient modules, up to 3072 × 768) on CUDA against the CPU and against a float64 SVD
   of the materialized ΔW: every σᵢ within 1e-5·σ₁ (`--rtol`), numerical ranks equal.
4. 7B: spectra + rank metrics of the Llama-2-7B-shaped adapter of `bench_analysis.py`
   (224 modules, r = 64, fp16; generated under --data once), CUDA vs CPU time; same spectra;
   and the CUDA time per module (batch_size 1) against the default same-shape batches.
5. reproduce: `lora-analysis reproduce --quick --device cuda` wall time (exit 0).

Prints a table (check, device, result, detail, time) and exits 1 if any check FAILs.
Without CUDA it runs degraded: the CUDA parts are reported "skipped (no CUDA)", and the CPU
paths it can check still run (the bf16-autocast step against fp32 on the CPU; the CPU
spectra against the float64 oracle), so CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_analysis import Adapter, AnalysisOptions, LoraConfig, LoraModule, analyze_adapter, inject_lora  # noqa: E402

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0


@dataclass
class Outcome:
    check: str
    device: str
    result: str  # "ok", "FAIL", "skipped"
    detail: str
    seconds: float = 0.0


def skipped(check: str, why: str) -> Outcome:
    return Outcome(check, "-", "skipped", why)


def verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


# ---------------------------------------------------------------- 1. train step


def _batch():
    from lora_analysis.training.data import collate, encode, load_dataset
    from lora_analysis.training.models import load_model

    data = load_dataset("rotten_tomatoes")
    torch.manual_seed(0)
    model, tokenizer, _ = load_model("minilm", "classification", data.label_names)
    texts, labels = data.texts[:16], data.labels[:16]
    return model, collate(encode(texts, tokenizer, 64), tokenizer.pad_token_id, labels)


def _step(base, batch, device: str, bf16: bool) -> tuple[float, torch.Tensor]:
    """(loss, all trainable gradients as one float64 CPU vector) of one forward + backward."""
    import copy

    from lora_analysis.lora import lora_layers

    model = inject_lora(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model):  # B ≠ 0, as after training: A gets gradients too
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    model.to(device).train()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    grads = torch.cat([p.grad.detach().double().cpu().flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def check_train_step() -> list[Outcome]:
    start = time.perf_counter()
    base, batch = _batch()
    device = "cuda" if CUDA else "cpu"
    loss32, grad32 = _step(base, batch, device, bf16=False)
    loss16, grad16 = _step(base, batch, device, bf16=True)
    rel, cos = abs(loss16 - loss32) / abs(loss32), _cosine(grad16, grad32)
    outcomes = [Outcome("train step: bf16 autocast vs fp32", device, verdict(rel <= 1e-2 and cos >= 0.9),
                        f"loss {loss16:.5f} vs {loss32:.5f} (rel {rel:.1e} ≤ 1e-2), grad cosine {cos:.3f} ≥ 0.9",
                        time.perf_counter() - start)]
    if not CUDA:
        return outcomes + [skipped("train step: CUDA fp32 vs CPU fp32", "no CUDA"),
                           skipped("trainer: 2 steps", "no CUDA (the CPU trainer is covered by the tests)")]
    start = time.perf_counter()
    loss_cpu, grad_cpu = _step(base, batch, "cpu", bf16=False)
    rel, cos = abs(loss32 - loss_cpu) / abs(loss_cpu), _cosine(grad32, grad_cpu)
    outcomes.append(Outcome("train step: CUDA fp32 vs CPU fp32", "cuda", verdict(rel <= 1e-4 and cos >= 0.9999),
                            f"loss {loss32:.6f} vs {loss_cpu:.6f} (rel {rel:.1e} ≤ 1e-4), grad cosine {cos:.6f}",
                            time.perf_counter() - start))
    from lora_analysis import TrainConfig, train

    start = time.perf_counter()
    result = train(TrainConfig(steps=2, device="cuda", progress=False, eval_every=0))
    losses = result.metrics["train_loss"]
    ok = len(losses) == 2 and all(math.isfinite(x) for x in losses)
    outcomes.append(Outcome("trainer: 2 steps (bf16 autocast)", "cuda", verdict(ok), f"losses {losses}",
                            time.perf_counter() - start))
    return outcomes


# ---------------------------------------------------------------- 2. DDP


def check_ddp() -> list[Outcome]:
    if GPUS < 2:
        return [skipped("DDP: 2 steps, NCCL, 2 processes", f"needs ≥ 2 GPUs, {GPUS} visible")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "lora_analysis", "train", "--steps", "2", "--device", "cuda", "--output-dir", str(out), "--quiet"]
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
        if proc.returncode:
            detail = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
            return [Outcome("DDP: 2 steps, NCCL, 2 processes", "cuda ×2", "FAIL", detail, time.perf_counter() - start)]
        metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["train_loss"]
    ok = metrics["world_size"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    return [Outcome("DDP: 2 steps, NCCL, 2 processes", "cuda ×2", verdict(ok),
                    f"world_size {metrics['world_size']}, losses {losses}", time.perf_counter() - start)]


# ---------------------------------------------------------------- 3. analyze


def synthetic_adapter() -> Adapter:
    """Modules of several shapes and dtypes; two are rank-deficient (inner rank < r)."""
    g = torch.Generator().manual_seed(0)
    specs = [  # (d_out, d_in, r, inner rank, dtype)
        (768, 768, 8, 8, torch.float16), (3072, 768, 16, 16, torch.bfloat16), (768, 3072, 16, 16, torch.float32),
        (1024, 1024, 64, 32, torch.float16), (512, 2048, 32, 5, torch.float32), (64, 4096, 64, 64, torch.bfloat16),
    ]
    modules = {}
    for i, (d_out, d_in, r, inner, dtype) in enumerate(specs):
        A = (torch.randn(inner, d_in, generator=g) / d_in**0.5)
        A = torch.cat([A, torch.randn(r - inner, inner, generator=g) @ A]) if inner < r else A
        B = torch.randn(d_out, r, generator=g) * 0.01
        modules[f"model.layers.{i}.proj"] = LoraModule(A=A.to(dtype), B=B.to(dtype), alpha=2.0 * r)
    return Adapter(modules)


def _worst_error(spectra: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], ranks: dict[str, int]) -> float:
    """max over modules of max_{i ≤ rank} |σᵢ − σᵢ^ref| / σ₁^ref."""
    worst = 0.0
    for name, S in spectra.items():
        k = ranks[name]
        ref = reference[name][:k].double()
        worst = max(worst, float((S[:k].double().cpu() - ref).abs().max() / ref[0]))
    return worst


def check_analyze(rtol: float) -> list[Outcome]:
    adapter = synthetic_adapter()
    oracle = {name: torch.linalg.svdvals(m.scale * (m.B.double() @ m.A.double())) for name, m in adapter.items()}
    outcomes = []
    results = {}
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        start = time.perf_counter()
        analysis = analyze_adapter(adapter, options=AnalysisOptions(device=device), progress=False)
        seconds = time.perf_counter() - start
        spectra = {name: r.spectrum.S for name, r in analysis.modules.items()}
        ranks = {name: r.metrics.numerical_rank for name, r in analysis.modules.items()}
        results[device] = (spectra, ranks)
        oracle_ranks = {name: int((S > S[0] * max(adapter[name].d_out, adapter[name].d_in) * torch.finfo(torch.float32).eps).sum())
                        for name, S in oracle.items()}
        error = _worst_error(spectra, oracle, ranks)
        ok = error <= rtol and ranks == oracle_ranks
        outcomes.append(Outcome("analyze vs float64 SVD of ΔW", device, verdict(ok),
                                f"max |Δσ|/σ₁ {error:.1e} ≤ {rtol:g}; ranks {sorted(ranks.values())}", seconds))
    if not CUDA:
        return outcomes + [skipped("analyze: CUDA vs CPU spectra", "no CUDA")]
    (gpu, gpu_ranks), (cpu, cpu_ranks) = results["cuda"], results["cpu"]
    error = _worst_error(gpu, cpu, cpu_ranks)
    ok = error <= rtol and gpu_ranks == cpu_ranks
    outcomes.append(Outcome("analyze: CUDA vs CPU spectra", "cuda", verdict(ok),
                            f"max |Δσ|/σ₁ {error:.1e} ≤ {rtol:g}; numerical ranks equal: {gpu_ranks == cpu_ranks}"))
    return outcomes


# ---------------------------------------------------------------- 4. 7B-shaped analysis time


def check_7b(data: Path, rtol: float) -> list[Outcome]:
    if not CUDA:
        return [skipped("7B-shaped analysis: CUDA vs CPU time", "no CUDA")]
    from bench_analysis import adapter_path, generate, lazy_modules

    from lora_analysis.analysis import iter_spectra

    path = adapter_path(data, 0)
    if not path.exists():
        generate(path, 0)
    timings, spectra = {}, {}
    # The first CUDA pass warms up (context, kernels); batch_size 1 against the default batches
    # of consecutive same-shape modules says whether batching pays on this GPU (on 2 CPU cores it
    # does not: benchmarks/README.md).
    for device, batch_size in (("cuda", 16), ("cpu", 16), ("cuda", 16), ("cuda", 1)):
        start = time.perf_counter()
        result = {name: s for name, s in iter_spectra(lazy_modules(path), device=device, batch_size=batch_size)}
        for s in result.values():
            s.metrics()
        if device == "cuda":
            torch.cuda.synchronize()
        timings[device, batch_size] = time.perf_counter() - start
        spectra[device] = result
    ranks = {name: s.numerical_rank for name, s in spectra["cpu"].items()}
    error = _worst_error({n: s.S for n, s in spectra["cuda"].items()}, {n: s.S for n, s in spectra["cpu"].items()}, ranks)
    same_ranks = ranks == {name: s.numerical_rank for name, s in spectra["cuda"].items()}
    cuda, cpu = timings["cuda", 16], timings["cpu", 16]
    detail = (f"CUDA {cuda:.2f} s vs CPU {cpu:.2f} s ({cpu / cuda:.1f}× faster); CUDA per module (batch_size 1) "
              f"{timings['cuda', 1]:.2f} s; 224 modules; max |Δσ|/σ₁ {error:.1e}")
    return [Outcome("7B-shaped analysis: CUDA vs CPU", "cuda", verdict(error <= rtol and same_ranks), detail, cuda)]


# ---------------------------------------------------------------- 5. reproduce --quick


def check_reproduce() -> list[Outcome]:
    if not CUDA:
        return [skipped("reproduce --quick", "no CUDA (CPU: tests/test_reproduce.py)")]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lora_analysis", "reproduce", "--quick", "--device", "cuda", "--quiet",
                   "--out", str(Path(tmp) / "figures"), "--run-dir", str(Path(tmp) / "runs")]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)
        seconds = time.perf_counter() - start
    last = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else ""
    return [Outcome("reproduce --quick", "cuda", verdict(proc.returncode == 0),
                    f"exit {proc.returncode}, wall {seconds:.1f} s {last}".strip(), seconds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "_data", help="where the 7B-shaped adapter is kept")
    parser.add_argument("--rtol", type=float, default=1e-5, help="spectra agree when every |Δσᵢ| ≤ rtol·σ₁ (default 1e-5)")
    parser.add_argument("--only", nargs="+", choices=["train", "ddp", "analyze", "7b", "reproduce"],
                        help="run only these checks (default: all)")
    args = parser.parse_args(argv)
    if not CUDA:
        print("gpu_check: no CUDA device: running degraded (CUDA checks skipped; CPU paths checked)", file=sys.stderr)
    checks: dict[str, Callable[[], list[Outcome]]] = {
        "train": check_train_step, "ddp": check_ddp, "analyze": lambda: check_analyze(args.rtol),
        "7b": lambda: check_7b(args.data, args.rtol), "reproduce": check_reproduce,
    }
    outcomes: list[Outcome] = []
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        try:
            outcomes += check()
        except Exception as err:  # noqa: BLE001 - a crash is a failed check; the others still run
            outcomes.append(Outcome(name, "-", "FAIL", f"{type(err).__name__}: {err}"))
    device = torch.cuda.get_device_name(0) if CUDA else "none"
    print(f"GPU: {device} ({GPUS} visible); torch {torch.__version__}; CUDA {torch.version.cuda}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| check | device | result | detail | time |\n|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.check} | {o.device} | {o.result} | {o.detail} | {o.seconds:.1f} s |")
    failed = [o.check for o in outcomes if o.result == "FAIL"]
    print(f"{len(failed)} failed, {sum(o.result == 'ok' for o in outcomes)} ok, "
          f"{sum(o.result == 'skipped' for o in outcomes)} skipped" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
