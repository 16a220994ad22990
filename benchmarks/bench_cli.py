"""`lora-analysis analyze` from the command line vs. the bare exact floor, process start included.

    OMP_NUM_THREADS=2 python benchmarks/bench_cli.py [--data benchmarks/_data] [--repeat 3]

Adapter: the Llama-2-7B-shaped synthetic adapter of `bench_analysis.py` (224 modules, r = 64,
fp16, ~320 MB; generated there once). Two fresh processes, alternated `--repeat` times:

- floor: `python -c` importing torch and safetensors, reading each factor, one QR of B and of
  Aᵀ and one r×r SVD per module, nothing else;
- cli: `python -m lora_analysis analyze ADAPTER --format json -o report.json --quiet`, the
  full report (every metric and all singular values of every module).

Reports best and median wall time, CPU time (user + system) and peak RSS of each, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_analysis import adapter_path, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FLOOR = """
import sys, torch
from safetensors import safe_open
with safe_open(sys.argv[1], framework="pt", device="cpu") as f:
    names = sorted({k.rsplit(".lora_", 1)[0] for k in f.keys()})
    for n in names:
        A, B = f.get_tensor(n + ".lora_A.weight"), f.get_tensor(n + ".lora_B.weight")
        _, R_B = torch.linalg.qr(B.float())
        _, R_A = torch.linalg.qr(A.float().T)
        torch.linalg.svd(R_B.double() @ R_A.double().T)
"""


def measure(command: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user + system, peak RSS in MB) of one run of `command` in a
    fresh process.

    CPU time is the steadier number on a shared machine: other processes stretch the wall
    time, not (much) the CPU time the command itself needs.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "_data")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    adapter = adapter_path(args.data, 0)
    if not adapter.exists():
        print(f"generating {adapter}", file=sys.stderr)
        generate(adapter, 0)
    walls: dict[str, list[float]] = {"floor": [], "cli": []}
    cpus: dict[str, list[float]] = {"floor": [], "cli": []}
    peaks: dict[str, list[float]] = {"floor": [], "cli": []}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "floor": [sys.executable, "-c", FLOOR, str(adapter)],
            "cli": [sys.executable, "-m", "lora_analysis", "analyze", str(adapter), "--format", "json",
                    "-o", str(Path(tmp) / "report.json"), "--quiet"],
        }
        for _ in range(args.repeat):
            for name, command in commands.items():
                wall, cpu, peak = measure(command)
                walls[name].append(wall)
                cpus[name].append(cpu)
                peaks[name].append(peak)
    print(f"adapter {adapter.name}, {adapter.stat().st_size / 2**20:.0f} MiB; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {os.getloadavg()[0]:.2f}")
    for name in walls:
        print(f"{name:6s} wall best {min(walls[name]):6.2f} s  median {statistics.median(walls[name]):6.2f} s   "
              f"CPU best {min(cpus[name]):6.2f} s  median {statistics.median(cpus[name]):6.2f} s   "
              f"peak RSS {max(peaks[name]):6.0f} MB   ({args.repeat} runs)")
    print(f"cli / floor: wall (best) {min(walls['cli']) / min(walls['floor']):.2f}x, "
          f"CPU (median) {statistics.median(cpus['cli']) / statistics.median(cpus['floor']):.2f}x, "
          f"peak RSS {max(peaks['cli']) / max(peaks['floor']):.2f}x")


if __name__ == "__main__":
    main()
