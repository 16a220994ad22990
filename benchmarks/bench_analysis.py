"""Spectrum + rank metrics and φ grids of a Llama-2-7B-shaped LoRA adapter: speed and memory.

    OMP_NUM_THREADS=2 python benchmarks/bench_analysis.py [--data benchmarks/_data] [--device cpu]

Generates (once, cached under --data) two synthetic PEFT-layout adapters: 32 layers ×
q,k,v,o (4096×4096), gate/up (11008×4096), down (4096×11008), r = 64, fp16, ~320 MB each.
Each phase runs in a fresh subprocess so its peak memory is its own:

- spectrum: interleaved passes (fastest of --repeat reported) of
  floor: read each factor lazily (safetensors), one QR of B and of Aᵀ, one r×r SVD, nothing else;
  ours: `iter_spectra` on the same lazy stream + rank metrics per module (U, V not formed);
  ours+UV: the same, also forming U and V of every module
- in-memory: `adapter_spectra` on a fully loaded Adapter (not counting the load)
- naive: materialize ΔW + torch.linalg.svd on one module of each shape, extrapolated to all 224
- phi: `compare_adapters` of the two adapters (224 pairs of 64×64 grids), bases "A" and "dW-left"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_analysis import Adapter, LoraModule  # noqa: E402
from lora_analysis.analysis import adapter_spectra, compare_adapters, iter_spectra  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE, RANK, ALPHA = 32, 4096, 11008, 64, 16.0
SHAPES = {  # module → (d_out, d_in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
NAMES = [f"model.layers.{i}.{m}" for i in range(LAYERS) for m in SHAPES]
PREFIX = "base_model.model."


def adapter_path(data: Path, seed: int) -> Path:
    return data / f"llama2_7b_r{RANK}_seed{seed}.safetensors"


def generate(path: Path, seed: int) -> None:
    """PEFT-layout fp16 factors; B random (as after training), A Kaiming-scale."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in NAMES:
        d_out, d_in = SHAPES[name.split(".", 3)[3]]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn(RANK, d_in, generator=g) / d_in**0.5).half()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn(d_out, RANK, generator=g) * 1e-2).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def lazy_modules(path: Path):
    """(name, LoraModule) read one tensor at a time through the file's memory mapping."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in NAMES:
            A = f.get_tensor(f"{PREFIX}{name}.lora_A.weight")
            B = f.get_tensor(f"{PREFIX}{name}.lora_B.weight")
            yield name, LoraModule(A=A, B=B, alpha=ALPHA)


def private_memory_mb() -> float:
    """Resident anonymous memory (excludes the file's mapping), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak private memory above the level at creation, sampled by `sample()`."""

    def __init__(self):
        self.base = private_memory_mb()
        self.peak = 0.0

    def sample(self) -> None:
        self.peak = max(self.peak, private_memory_mb() - self.base)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def floor_pass(path: Path, device: str, memory: PeakMemory) -> None:
    """The bare minimum: load, one QR of B and of Aᵀ, one r×r SVD per module."""
    for _, m in lazy_modules(path):
        _, R_B = torch.linalg.qr(m.B.to(device, torch.float32))
        _, R_A = torch.linalg.qr(m.A.to(device, torch.float32).T)
        torch.linalg.svd((R_B.double() @ R_A.double().T).cpu())
        memory.sample()


def ours_pass(path: Path, device: str, memory: PeakMemory, form_vectors: bool = False) -> dict:
    """Our spectra and rank metrics of every module; U and V formed only if asked."""
    metrics = {}
    for name, spectrum in iter_spectra(lazy_modules(path), device=device):
        metrics[name] = spectrum.metrics()
        if form_vectors:
            spectrum.U, spectrum.V  # noqa: B018 — formed on access
        memory.sample()
    return metrics


def phase_spectrum(data: Path, device: str, repeat: int) -> dict:
    """floor, ours and ours+UV passes interleaved, so a busy shared machine slows all alike."""
    path = adapter_path(data, 0)
    passes = {
        "floor": lambda memory: floor_pass(path, device, memory),
        "ours": lambda memory: ours_pass(path, device, memory),
        "ours+UV": lambda memory: ours_pass(path, device, memory, form_vectors=True),
    }
    seconds = {name: [] for name in passes}
    peak_mb = dict.fromkeys(passes, 0.0)
    for _ in range(repeat):
        for name, run in passes.items():
            memory = PeakMemory()
            start = time.perf_counter()
            result = run(memory)
            synchronize()
            seconds[name].append(time.perf_counter() - start)
            peak_mb[name] = max(peak_mb[name], memory.peak)
    ranks = sorted({m.numerical_rank for m in result.values()})
    return {
        "seconds": {name: min(times) for name, times in seconds.items()},
        "all_seconds": seconds,
        "private_mb": peak_mb,
        "ratio_ours_to_floor": min(seconds["ours"]) / min(seconds["floor"]),
        "numerical_ranks": ranks,
    }


def phase_in_memory(data: Path, device: str, repeat: int) -> dict:
    adapter = Adapter(dict(lazy_modules(adapter_path(data, 0))))

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        metrics = {name: s.metrics() for name, s in adapter_spectra(adapter, progress=False, device=device).items()}
        synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "modules": len(metrics)}


def phase_naive(data: Path, device: str, repeat: int) -> dict:
    """Materialize ΔW (float32) and take its SVD, for the first module of each shape."""
    seconds = {}
    for name, m in lazy_modules(adapter_path(data, 0)):
        kind = name.split(".", 3)[3]
        shape = SHAPES[kind]
        if shape in seconds:
            continue
        start = time.perf_counter()
        delta = m.scale * (m.B.to(device, torch.float32) @ m.A.to(device, torch.float32))
        torch.linalg.svd(delta, full_matrices=False)
        synchronize()
        seconds[shape] = time.perf_counter() - start
        if len(seconds) == len(set(SHAPES.values())):
            break
    per_layer = sum(seconds[shape] for shape in SHAPES.values())
    return {"seconds_per_shape": {f"{o}x{i}": s for (o, i), s in seconds.items()}, "extrapolated_seconds": LAYERS * per_layer}


def phase_phi(data: Path, device: str, repeat: int) -> dict:
    spectra = [dict(iter_spectra(lazy_modules(adapter_path(data, seed)), device=device)) for seed in (0, 1)]
    result = {}
    for basis in ("A", "dW-left"):
        times = []
        for _ in range(repeat):
            # Fresh spectra each time: the A basis (an r×r SVD per module) is part of the cost.
            fresh = [_fresh(s) for s in spectra]
            start = time.perf_counter()
            comparison = compare_adapters(fresh[0], fresh[1], basis=basis)
            synchronize()
            times.append(time.perf_counter() - start)
        result[basis] = {
            "seconds": min(times),
            "pairs": len(comparison.modules),
            "grid": list(next(iter(comparison.modules.values())).grid.shape),
            "mean_phi_11": sum(c.phi_11 for c in comparison.modules.values()) / len(comparison.modules),
        }
    return result


def _fresh(spectra: dict) -> dict:
    """Copies of the spectra without their cached bases."""
    return {name: dataclasses.replace(s) for name, s in spectra.items()}


PHASES = {
    "spectrum": phase_spectrum,
    "in-memory": phase_in_memory,
    "naive": phase_naive,
    "phi": phase_phi,
}


def run_phase(name: str, args) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--data", str(args.data), "--device", args.device, "--repeat", str(args.repeat)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "_data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per phase; the fastest is reported")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(PHASES), help="phases to leave out")
    args = parser.parse_args()
    if args.phase:
        rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = PHASES[args.phase](args.data, args.device, args.repeat)
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_after_imports_mb"] = rss_after_imports
        print(json.dumps(result))
        return
    for seed in (0, 1):
        if not adapter_path(args.data, seed).exists():
            print(f"generating {adapter_path(args.data, seed)}", file=sys.stderr)
            generate(adapter_path(args.data, seed), seed)
    size_mb = adapter_path(args.data, 0).stat().st_size / 2**20
    print(f"adapter: {len(NAMES)} modules, r={RANK}, fp16, {size_mb:.0f} MiB; device {args.device}; "
          f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results = {}
    for name in PHASES:
        if name not in args.skip:
            results[name] = run_phase(name, args)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
