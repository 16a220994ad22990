"""Scale: peak memory against the floor, batching by shape vs the per-module floor, a
70B-shaped adapter, and `scan` throughput.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py memory [--repeat 1]
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py batching [--repeat 3]
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py 70b [--repeat 1]
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py scan [--adapters 200]

memory: the Llama-2-7B-shaped adapter of `bench_analysis.py` (224 modules, r = 64, fp16): two
    floor processes (import torch, read each factor, one QR of B and of Aᵀ, one r×r SVD per
    module; the factors read into memory, or through safetensors' memory map as in
    `bench_cli.py`) against `lora-analysis analyze --format json`, fresh processes: wall, CPU,
    peak RSS, and its parts RssAnon (the process's own memory) and RssFile (mapped files:
    libraries, and a mapped adapter's touched pages) sampled from /proc every 5 ms.

batching: on the Llama-2-7B-shaped adapter of `bench_analysis.py` (224 modules, r = 64, fp16),
    interleaved passes in one process (fastest of --repeat): the floor (read each factor lazily,
    one QR of B and of Aᵀ, one r×r SVD per module), and `iter_spectra` + rank metrics with
    batch_size 1 (per module), with consecutive modules of one shape batched (the default,
    batch_size 16: q,k,v,o then gate,up then down), and with the modules grouped by shape
    across layers (read in that order; batches of 32 of one shape).
70b: a Llama-2-70B-shaped synthetic PEFT adapter (80 layers × q,o 8192×8192, k,v 1024×8192
    (grouped-query attention), gate/up 28672×8192, down 8192×28672, r = 64, fp16, 1.6 GB):
    streamed to disk one tensor at a time; then the memory phase's two processes on it.
scan: a directory of --adapters small adapters of mixed formats (PEFT directories, lone files
    of ours, kohya files, loralib .pt; 12 layers × query,value 768×768, r = 8), scanned by
    the CLI with 1 and with 2 workers (adapters per second, process start included), and the
    7B-shaped adapter alone.

Each prints a table on stdout with the load average; data is generated once under --data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_analysis import NAMES, PREFIX, PeakMemory, adapter_path, floor_pass, generate, lazy_modules  # noqa: E402
from bench_cli import FLOOR, measure  # noqa: E402

from lora_analysis import Adapter, LoraModule, save_adapter  # noqa: E402
from lora_analysis.analysis import iter_spectra  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The floor of the issue: the interpreter with torch, plus one module's working set (its
# factors read into memory, not mapped: a mapping keeps the whole file resident by the end).
FLOOR_READ = """
import json, sys, torch
with open(sys.argv[1], "rb", buffering=0) as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)

    def get(key):
        entry = header[key]
        start, end = entry["data_offsets"]
        data = torch.empty(end - start, dtype=torch.uint8)
        f.seek(8 + n + start)
        f.readinto(data.numpy().data)
        return data.view(torch.float16).reshape(entry["shape"])

    for name in sorted({k.rsplit(".lora_", 1)[0] for k in header}):
        A, B = get(name + ".lora_A.weight"), get(name + ".lora_B.weight")
        _, R_B = torch.linalg.qr(B.float())
        _, R_A = torch.linalg.qr(A.float().T)
        torch.linalg.svd(R_B.double() @ R_A.double().T)
"""


def load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


# ---------------------------------------------------------------- batching


def by_shape_modules(path: Path):
    """The modules of `path` read lazily in shape order: all 4096×4096 ones, then 11008×4096, ..."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        def shape(name: str) -> tuple:
            return tuple(f.get_slice(f"{PREFIX}{name}.lora_B.weight").get_shape()), tuple(
                f.get_slice(f"{PREFIX}{name}.lora_A.weight").get_shape())

        for name in sorted(NAMES, key=lambda n: (shape(n), NAMES.index(n))):
            A = f.get_tensor(f"{PREFIX}{name}.lora_A.weight")
            B = f.get_tensor(f"{PREFIX}{name}.lora_B.weight")
            yield name, LoraModule(A=A, B=B, alpha=16.0)


def spectra_pass(modules, batch_size: int) -> dict:
    return {name: s.metrics() for name, s in iter_spectra(modules, device="cpu", batch_size=batch_size)}


def batching(args: argparse.Namespace) -> None:
    path = adapter_path(args.data, 0)
    if not path.exists():
        generate(path, 0)
    passes: dict[str, Callable[[], object]] = {
        "floor (per module, bare)": lambda: floor_pass(path, "cpu", PeakMemory()),
        "ours, per module (batch_size 1)": lambda: spectra_pass(lazy_modules(path), 1),
        "ours, consecutive same shape (default)": lambda: spectra_pass(lazy_modules(path), 16),
        "ours, grouped by shape, batches of 32": lambda: spectra_pass(by_shape_modules(path), 32),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    reference = spectra_pass(lazy_modules(path), 1)  # warm-up, and the values every pass must give
    for _ in range(args.repeat):
        for name, run in passes.items():
            start = time.perf_counter()
            result = run()
            times[name].append(time.perf_counter() - start)
            if isinstance(result, dict):
                assert result.keys() == reference.keys()
                worst = max(abs(result[n].sigma_max - reference[n].sigma_max) / reference[n].sigma_max for n in result)
                assert worst < 1e-5, (name, worst)
    floor = min(times["floor (per module, bare)"])
    print(f"7B-shaped adapter ({len(NAMES)} modules, r = 64, fp16); torch threads {torch.get_num_threads()}; "
          f"{args.repeat} interleaved passes; {load()}")
    print("| pass | best | median | best / floor |\n|---|---|---|---|")
    for name, values in times.items():
        values.sort()
        print(f"| {name} | {values[0]:.2f} s | {values[len(values) // 2]:.2f} s | {values[0] / floor:.2f}× |")


# ---------------------------------------------------------------- 70B

LAYERS_70B, HIDDEN_70B, KV_70B, INTERMEDIATE_70B, RANK = 80, 8192, 1024, 28672, 64
SHAPES_70B = {  # module → (d_out, d_in)
    "self_attn.q_proj": (HIDDEN_70B, HIDDEN_70B), "self_attn.k_proj": (KV_70B, HIDDEN_70B),
    "self_attn.v_proj": (KV_70B, HIDDEN_70B), "self_attn.o_proj": (HIDDEN_70B, HIDDEN_70B),
    "mlp.gate_proj": (INTERMEDIATE_70B, HIDDEN_70B), "mlp.up_proj": (INTERMEDIATE_70B, HIDDEN_70B),
    "mlp.down_proj": (HIDDEN_70B, INTERMEDIATE_70B),
}


def path_70b(data: Path) -> Path:
    return data / f"llama2_70b_r{RANK}.safetensors"


def generate_70b(path: Path) -> None:
    """PEFT-layout fp16 factors of 560 modules, streamed into a safetensors file one tensor at a
    time (the header first, from the shapes alone): never more than one tensor in memory."""
    entries = []  # (key, shape, seed)
    for i in range(LAYERS_70B):
        for j, (kind, (d_out, d_in)) in enumerate(SHAPES_70B.items()):
            name = f"{PREFIX}model.layers.{i}.{kind}"
            seed = 70 + 2 * (i * len(SHAPES_70B) + j)
            entries += [(f"{name}.lora_A.weight", (RANK, d_in), seed), (f"{name}.lora_B.weight", (d_out, RANK), seed + 1)]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, _ in entries:
        size = 2 * shape[0] * shape[1]
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, (rows, cols), seed in entries:
            g = torch.Generator().manual_seed(seed)
            if key.endswith("lora_A.weight"):  # Kaiming-scale A, small random B (as after training)
                tensor = torch.randn(rows, cols, generator=g) / cols**0.5
            else:
                tensor = torch.randn(rows, cols, generator=g) * 1e-2
            f.write(tensor.half().numpy().tobytes())
    tmp.replace(path)


def measure_memory(command: list[str]) -> dict[str, float]:
    """Wall and CPU seconds, peak RSS (`ru_maxrss`), and the peaks of its two parts sampled
    every 5 ms from /proc: RssAnon (the process's own memory) and RssFile (mapped files: the
    libraries and the adapter's memory-mapped pages, page cache the kernel can drop)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) / 1024)
        except OSError:  # exited between wait4 and the read
            pass
        time.sleep(0.005)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{command[:4]} failed: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss / 1024,
            "anon": peaks["RssAnon"], "file": peaks["RssFile"]}


def memory_table(path: Path, label: str, repeat: int) -> None:
    """The floor process against `lora-analysis analyze --format json` on `path`, alternated."""
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "floor, factors read (bare load + QR + core SVD)": [sys.executable, "-c", FLOOR_READ, str(path)],
            "floor, factors through safetensors' memory map": [sys.executable, "-c", FLOOR, str(path)],
            "lora-analysis analyze --format json": [
                sys.executable, "-m", "lora_analysis", "analyze", str(path), "--format", "json",
                "-o", str(Path(tmp) / "report.json"), "--quiet", "--device", "cpu"],
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
        for i in range(repeat):
            for name, command in commands.items():
                (Path(tmp) / "report.json").unlink(missing_ok=True)
                results[name].append(measure_memory(command))
    print(f"{label}, {path.stat().st_size / 2**20:.0f} MiB; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{repeat} run(s) each, alternated; {load()}")
    print("| process | wall (best) | CPU (best) | peak RSS | peak RssAnon | peak RssFile |\n|---|---|---|---|---|---|")
    for name, runs in results.items():
        best = {key: (min if key in ("wall", "cpu") else max)(r[key] for r in runs) for key in runs[0]}
        print(f"| {name} | {best['wall']:.1f} s | {best['cpu']:.1f} s | {best['peak_rss']:.0f} MB | "
              f"{best['anon']:.0f} MB | {best['file']:.0f} MB |")
    floor, _, ours = (results[name] for name in commands)
    ratio = {key: max(r[key] for r in ours) / max(r[key] for r in floor) for key in ("peak_rss", "anon")}
    print(f"analyze / floor (factors read): CPU {min(r['cpu'] for r in ours) / min(r['cpu'] for r in floor):.2f}×, "
          f"peak RSS {ratio['peak_rss']:.2f}×, peak RssAnon {ratio['anon']:.2f}×")


def memory(args: argparse.Namespace) -> None:
    path = adapter_path(args.data, 0)
    if not path.exists():
        generate(path, 0)
    memory_table(path, f"7B-shaped adapter: {len(NAMES)} modules, r = 64, fp16", args.repeat)


def seventy(args: argparse.Namespace) -> None:
    path = path_70b(args.data)
    if not path.exists():
        print(f"generating {path}", file=sys.stderr)
        generate_70b(path)
    memory_table(path, f"70B-shaped adapter: {LAYERS_70B * len(SHAPES_70B)} modules, r = {RANK}, fp16", args.repeat)


# ---------------------------------------------------------------- scan


def small_modules(seed: int) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {f"bert.encoder.layer.{i}.attention.self.{p}": LoraModule(torch.randn(8, 768, generator=g) / 28,
                                                                     torch.randn(768, 8, generator=g) / 100, 16.0)
            for i in range(12) for p in ("query", "value")}


def make_hub(root: Path, count: int) -> None:
    """`count` adapters, cycling through PEFT directory, lone file of ours, kohya, loralib."""
    for i in range(count):
        modules = small_modules(i)
        kind = ("peft", "ours", "kohya", "loralib")[i % 4]
        if kind == "peft":
            save_adapter(Adapter(modules), root / f"peft/run{i:03d}")
        elif kind == "ours":
            save_adapter(Adapter(modules), root / f"ours/a{i:03d}.safetensors")
        elif kind == "kohya":
            tensors = {}
            for name, m in modules.items():
                key = "lora_te_" + name.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": m.A, f"{key}.lora_up.weight": m.B, f"{key}.alpha": torch.tensor(16.0)}
            (root / "kohya").mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(root / f"kohya/k{i:03d}.safetensors"))
        else:
            (root / "loralib").mkdir(parents=True, exist_ok=True)
            torch.save({f"{n}.lora_{x}": getattr(m, x) for n, m in modules.items() for x in "AB"},
                       root / f"loralib/l{i:03d}.pt")


def scan(args: argparse.Namespace) -> None:
    hub = args.data / f"hub{args.adapters}"
    if not hub.exists():
        print(f"generating {hub}", file=sys.stderr)
        tmp = args.data / f".hub{args.adapters}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_hub(tmp, args.adapters)
        tmp.rename(hub)
    seven = adapter_path(args.data, 0)
    if not seven.exists():
        generate(seven, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, root, count, workers in ((f"{args.adapters} small mixed", hub, args.adapters, 1),
                                            (f"{args.adapters} small mixed", hub, args.adapters, 2),
                                            ("7B-shaped (224 modules)", seven, 1, 1)):
            out = Path(tmp) / f"scan{workers}{root.name}.csv"
            command = [sys.executable, "-m", "lora_analysis", "scan", str(root), "-o", str(out), "--quiet",
                       "--workers", str(workers), "--device", "cpu"]
            wall, cpu, peak = measure(command)
            rows.append((label, workers, wall, count / wall, cpu, peak))
    print(f"lora-analysis scan, process start included; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{os.cpu_count()} CPUs; {load()}")
    print("| adapters | workers | wall | adapters / s | CPU (all processes) | peak RSS (largest process) |\n|---|---|---|---|---|---|")
    for label, workers, wall, rate, cpu, peak in rows:
        print(f"| {label} | {workers} | {wall:.1f} s | {rate:.2f} | {cpu:.1f} s | {peak:.0f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["memory", "batching", "70b", "scan"])
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "_data")
    parser.add_argument("--repeat", type=int, default=1, help="passes (batching) or runs (memory, 70b) per contender")
    parser.add_argument("--adapters", type=int, default=200, help="scan: adapters in the generated directory")
    args = parser.parse_args()
    {"memory": memory, "batching": batching, "70b": seventy, "scan": scan}[args.phase](args)


if __name__ == "__main__":
    main()
