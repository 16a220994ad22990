"""DDP: the same CLI command under torchrun (2 CPU processes, gloo) trains what one process
trains with the combined batch; only rank 0 writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import save_tiny_bert, write_sentiment_csv

from lora_analysis import TrainConfig, load_adapter, train

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    # Ungrouped batches on both sides: each rank pads its own slice, and with length grouping
    # the per-rank padding differs enough to move Adam-updated factors by ~3e-5 (float order).
    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)  # no dropout: ranks' RNG streams differ
    data = write_sentiment_csv(tmp_path / "data.csv")
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "lora_analysis", "train", "--model", str(model), "--data", str(data), "--device", "cpu",
        "--batch-size", "4", "--steps", "8", "--lr", "0.05", "--eval-every", "4", "--output-dir", str(out), "--quiet", "--no-group-by-length",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val_accuracy") == 1  # rank 0 alone reports

    single = train(TrainConfig(model=str(model), data=str(data), device="cpu", batch_size=8, steps=8, lr=0.05, eval_every=4, progress=False, group_by_length=False))
    ddp = load_adapter(out)
    assert set(ddp.modules) == set(single.adapter.modules)
    for name, module in ddp.items():
        torch.testing.assert_close(module.A, single.adapter[name].A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(module.B, single.adapter[name].B, rtol=1e-4, atol=1e-6)
    for name, tensor in ddp.extra_tensors.items():
        torch.testing.assert_close(tensor, single.adapter.extra_tensors[name], rtol=1e-4, atol=1e-6)
    assert any(module.B.abs().sum() > 0 for module in ddp.modules.values())

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    for ours, theirs in zip(metrics["evals"], single.metrics["evals"], strict=True):
        assert ours["val_accuracy"] == theirs["val_accuracy"]  # sharded evaluation, summed over ranks
        assert abs(ours["val_loss"] - theirs["val_loss"]) < 1e-4
    torch.testing.assert_close(torch.tensor(metrics["train_loss"]), torch.tensor(single.metrics["train_loss"]), rtol=1e-4, atol=1e-5)


GROUP_TEARDOWN = """
import os, torch
from lora_analysis.training.distributed import _leave_process_group, init_distributed
init_distributed("cpu")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))  # imports torch._dynamo
model(torch.ones(2, 3)).sum().backward()
del model
_leave_process_group()  # what runs at exit
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
assert not [t for t in threads if "gloo" in t], threads
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux /proc")
def test_leaving_the_process_group_joins_gloos_threads_before_interpreter_exit(tmp_path):
    # A gloo thread still releasing the last collective's work when the interpreter finalized
    # made a rank abort now and then under load ("terminate called without an active
    # exception"); at exit the group must be destroyed and its threads joined first. DDP
    # imports torch.distributed.nn.functional, which used to pin the group so it could not be.
    script = tmp_path / "teardown.py"
    script.write_text(GROUP_TEARDOWN)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
