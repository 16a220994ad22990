"""Training never loses or garbles a user's files: refusals to overwrite, the output-directory
lock, verified checkpoints, consistent adapter pairs, strict metrics and manifests, and
progress output. The refusals that prevent data loss run the real CLI in a subprocess (and the
lock is held by a real `train` process); the follow-up runs and the many malformed-file cases
run the same CLI entry point in-process (`main`), which is faster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_fixtures import adapter_bytes, save_tiny_bert, write_sentiment_csv

from lora_analysis import LoraAnalysisError, TrainConfig, load_adapter, run_sweep, save_adapter, train
from lora_analysis.errors import AdapterFormatError
from lora_analysis.cli.main import main
from lora_analysis.fileio import LOCK_NAME, TEMP_SUFFIX, _host_tag, lock_directory
from lora_analysis.training import loop
from lora_analysis.training.checkpoint import payload_digest

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_assets")
    return {"bert": save_tiny_bert(root / "bert"), "csv": write_sentiment_csv(root / "data.csv")}


def cli_args(assets, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--steps", str(STEPS),
            "--batch-size", "4", "--checkpoint-every", "2", "--output-dir", str(out), "--quiet", *extra]


def config(assets, out: Path | None = None, **overrides) -> TrainConfig:
    values = dict(model=str(assets["bert"]), data=str(assets["csv"]), steps=STEPS, batch_size=4, checkpoint_every=2,
                  progress=False, output_dir=None if out is None else str(out))
    return TrainConfig(**{**values, **overrides})


def run_cli(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lora_analysis", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def refused_in_process(capsys, argv: list[str], *fragments: str) -> str:
    """`lora-analysis <argv>` exits 2 with one stderr line holding every fragment."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-analysis: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Path:
    """A finished run's directory (seed 0)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(assets, out))
    return out


@pytest.fixture(scope="module")
def interrupted(assets, tmp_path_factory) -> Path:
    """An unfinished run's directory: its checkpoint at step 2 of 6."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    save = loop.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(config(assets, out))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
    return out


# Refusing to overwrite (CLI) ---------------------------------------------------------------

def test_train_over_a_finished_adapter_is_refused_unless_overwrite(assets, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    proc = run_cli(*cli_args(assets, out, "--seed", "1"))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"lora-analysis: error: {out}: holds a trained adapter (adapter_model.safetensors, adapter_config.json, "
        "metrics.json); pass --overwrite to replace it, --resume to keep it if it is this run, or choose another "
        "output directory"
    ]
    assert snapshot(out) == before

    # Temp files: the user's own stay; only ours from a process that no longer runs are removed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ours_stale = out / f".adapter_model.safetensors.{dead.stdout.strip()}@{_host_tag()}.k2j4h1x0{TEMP_SUFFIX}"
    users = [out / ".notes.tmp", out / ".adapter_model.safetensors.abc123.tmp", out / "draft.tmp"]
    for path in [ours_stale, *users]:
        path.write_text("keep me?")
    assert main(cli_args(assets, out, "--seed", "1", "--overwrite")) == 0
    assert adapter_bytes(out) != before["adapter_model.safetensors"]
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1
    assert not ours_stale.exists() and all(p.read_text() == "keep me?" for p in users)


def test_train_into_an_unfinished_run_is_refused_without_resume(assets, interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    before = snapshot(out)
    proc = run_cli(*cli_args(assets, out))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"lora-analysis: error: {out}: holds an unfinished run (checkpoint.pt); continue it with --resume, "
        "or start over with --overwrite"
    ]
    assert snapshot(out) == before  # the checkpoint is neither deleted nor restarted


def test_resume_keeps_a_finished_run_and_refuses_foreign_adapter_files(assets, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    assert main(cli_args(assets, out, "--resume")) == 0
    assert "[finished]" in capsys.readouterr().out and snapshot(out) == before

    (out / "metrics.json").unlink()  # an adapter with no record of how it was trained
    refused_in_process(capsys, cli_args(assets, out, "--resume"), "neither a checkpoint nor a finished run's metrics.json")
    refused_in_process(capsys, cli_args(assets, out, "--resume", "--overwrite"), "resume and overwrite exclude each other")


def test_resume_into_an_empty_directory_starts_quietly(assets, tmp_path, capsys):
    assert main(cli_args(assets, tmp_path / "new", "--resume")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "[trained]" in captured.out


# The output-directory lock -----------------------------------------------------------------

def test_a_second_training_into_a_directory_in_use_exits_2_naming_the_holder(assets, tmp_path, capsys):
    out = tmp_path / "run"
    holder = run_cli(*cli_args(assets, out)[:-5], "--checkpoint-every", "0", "--steps", "1000000", "--output-dir", str(out))
    try:
        deadline = time.time() + 240
        while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text():
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read() if holder.poll() else "timeout"
            time.sleep(0.1)
        line = refused_in_process(capsys, cli_args(assets, out), f"{out}: in use by another training run (pid {holder.pid} on ")
        assert ", started 20" in line and "command: " in line and "train" in line
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert main(cli_args(assets, out)) == 0  # the killed holder left a lock file, but no lock
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "metrics.json"]


def test_a_sweep_locks_its_run_directory(assets, tmp_path, capsys):
    argv = ["sweep", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--steps", "2", "--batch-size", "4",
            "--ranks", "2", "--output-dir", str(tmp_path), "--quiet"]
    with lock_directory(tmp_path, "sweep"):
        refused_in_process(capsys, argv, f"{tmp_path}: in use by another sweep (pid {os.getpid()} on ")
    with lock_directory(tmp_path / "r2-s0-query_value", "training run"):  # a `train` into one of its cells
        refused_in_process(capsys, argv, "r2-s0-query_value: in use by another training run")
    assert main(argv) == 0


# A directory adapter's two files belong together ---------------------------------------------

def test_weights_beside_another_adapters_config_are_refused(tmp_path, finished):
    new, old = load_adapter(finished), load_adapter(finished)
    for module in old.modules.values():
        module.alpha = 32.0  # 4x the new adapter's: read with it, every σ would be 4x too large
    old.config.lora_alpha = 32.0
    save_adapter(old, tmp_path / "run")
    save_adapter(new, tmp_path / "other")
    # The state a crash between save_adapter's two writes leaves: new weights, the old config.
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", tmp_path / "run" / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: is not the config adapter_model\.safetensors was saved with \(differs in lora_alpha\)"):
        load_adapter(tmp_path / "run")
    proc = run_cli("analyze", str(tmp_path / "run"), "--quiet")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "adapter_config.json: is not the config" in stderr
    (tmp_path / "run" / "adapter_config.json").unlink()  # the weights' own header config then applies
    assert load_adapter(tmp_path / "run").config.lora_alpha == new.config.lora_alpha


# Verified checkpoints ------------------------------------------------------------------------

def rewrite(path: Path, change, checksum: bool = True) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    if checksum:
        payload["checksum"] = payload_digest(payload)
    torch.save(payload, path)


def flip_a_bit(payload):
    tensor = next(iter(payload["trainable"].values()))
    tensor.view(torch.int32).view(-1)[0] ^= 1 << 20


def set_in(*keys, value):
    def change(payload):
        target = payload
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return change


CORRUPTIONS = {
    "bit flip in tensor data": (flip_a_bit, False, "does not match its checksum"),
    "step 10^6, checksum not updated": (set_in("step", value=10**6), False, "does not match its checksum"),
    "step 10^6": (set_in("step", value=10**6), True, "step 1000000 is outside this run's 1..6"),
    "negative step": (set_in("step", value=-1), True, "step -1 is outside this run's 1..6"),
    "missing keys": (lambda p: p.pop("optimizer"), True, "missing ['optimizer']"),
    "emptied optimizer state": (set_in("optimizer", "state", value={}), True, "the optimizer state is empty at step 2"),
    "optimizer moments of the wrong shape": (
        lambda p: p["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), True, "is not Adam's at step 2"),
    "wrong RNG state size": (
        lambda p: p["rng"][0].update(cpu=p["rng"][0]["cpu"][:100]), True, "RNG state is not a torch.uint8 tensor of"),
    "RNG of another process count": (lambda p: p["rng"].append(p["rng"][0]), True, "saved by 2 process(es)"),
    "trainable tensor of another dtype": (
        lambda p: p["trainable"].update({k: v.double() for k, v in p["trainable"].items()}), True, "is not a torch.float32 tensor"),
    "schedule at another step": (set_in("scheduler", "last_epoch", value=5), True, "schedule is not at step 2"),
    "losses of another step count": (set_in("progress", "train_loss", value=[0.5]), True, "expected 2 finite training losses"),
    "older format": (set_in("format_version", value=1), False, "checkpoint format 1 cannot be verified"),
    "another recipe": (set_in("recipe", "lr", value=0.5), True, "cannot resume, the run was started with different settings (lr: 0.5 -> 0.002)"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_damaged_or_malformed_checkpoint_exits_2_naming_it(assets, interrupted, tmp_path, capsys, case):
    change, checksum, message = CORRUPTIONS[case]
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    rewrite(out / "checkpoint.pt", change, checksum)
    refused_in_process(capsys, cli_args(assets, out, "--resume"), f"{out / 'checkpoint.pt'}: ", message)
    assert not (out / "adapter_model.safetensors").exists()  # never resumed into an adapter, never "finished"


def test_an_intact_checkpoint_resumes_to_the_uninterrupted_result(assets, interrupted, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    assert train(config(assets, out, resume=True)).status == "resumed"
    assert adapter_bytes(out) == adapter_bytes(finished)


# Strict metrics.json and manifest.json -------------------------------------------------------

METRICS_DAMAGE = {
    "not JSON": lambda m: "{",
    "a list": lambda m: json.dumps([m]),
    "not completed": lambda m: json.dumps({**m, "completed": False}),
    "no config": lambda m: json.dumps({k: v for k, v in m.items() if k != "config"}),
    "config of wrong types": lambda m: json.dumps({**m, "config": {**m["config"], "targets": 3}}),
    "a final score that is text": lambda m: json.dumps({**m, "final": {"step": 6, "val_accuracy": "high"}}),
    "losses missing": lambda m: json.dumps({**m, "train_loss": []}),
}


@pytest.mark.parametrize("case", list(METRICS_DAMAGE))
def test_a_corrupt_metrics_json_exits_2(assets, finished, tmp_path, capsys, case):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(METRICS_DAMAGE[case](metrics))
    refused_in_process(capsys, cli_args(assets, out, "--resume"), f"{out / 'metrics.json'}: ")


def sweep_argv(assets, run_dir: Path) -> list[str]:
    return ["sweep", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--steps", "2", "--batch-size", "4",
            "--ranks", "2", "--targets", "query", "--output-dir", str(run_dir), "--quiet"]


MANIFEST_DAMAGE = {
    "not JSON": lambda m: "[",
    "a list": lambda m: json.dumps([m]),
    "cells a list": lambda m: json.dumps({**m, "cells": list(m["cells"])}),
    "a cell without r": lambda m: json.dumps({**m, "cells": {"r2-s0-query": {"path": "r2-s0-query", "seed": 0, "status": "finished"}}}),
    "a cell recording another rank": lambda m: json.dumps({**m, "cells": {"r2-s0-query": {**m["cells"]["r2-s0-query"], "r": 4}}}),
    "config a string": lambda m: json.dumps({**m, "config": "steps=2"}),
}


@pytest.fixture(scope="module")
def swept(assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("swept")
    assert main(sweep_argv(assets, run_dir)) == 0
    return run_dir


@pytest.mark.parametrize("case", list(MANIFEST_DAMAGE))
def test_a_corrupt_sweep_manifest_exits_2(assets, swept, tmp_path, capsys, case):
    run_dir = tmp_path / "sweep"
    shutil.copytree(swept, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(MANIFEST_DAMAGE[case](manifest))
    refused_in_process(capsys, sweep_argv(assets, run_dir), f"{run_dir / 'manifest.json'}: ")


def test_run_sweep_refuses_overwrite(assets, tmp_path):
    with pytest.raises(LoraAnalysisError, match="never overwrites"):
        run_sweep(config(assets, tmp_path, overwrite=True), tmp_path, [2], [0], [["query"]])


# Progress ------------------------------------------------------------------------------------

def bar_lines(stderr: str) -> list[str]:
    return [line for chunk in stderr.split("\n") for line in chunk.split("\r") if line.strip()]


def test_the_final_bar_line_is_drawn_once(assets, capsys):
    train(config(assets, progress=True))
    lines = bar_lines(capsys.readouterr().err)
    assert sum(f"{STEPS}/{STEPS}" in line for line in lines) == 1, lines


def test_a_sweep_draws_one_bar_with_one_eta_over_every_cell(assets, tmp_path, capsys):
    base = config(assets, progress=True)
    run_sweep(base, tmp_path, ranks=[1, 2], seeds=[0], target_sets=[["query"]])
    lines = bar_lines(capsys.readouterr().err)
    total = 2 * STEPS
    assert all(f"/{total} " in line for line in lines), lines  # one bar over both cells' steps
    assert any(line.startswith("sweep 2/2 r2-s0-query") for line in lines)
    assert sum(f"{total}/{total}" in line for line in lines) == 1
    assert not any("checkpoint" in line for line in lines)
    run_sweep(base, tmp_path, ranks=[1, 2], seeds=[0], target_sets=[["query"]])
    assert capsys.readouterr().err == ""  # nothing left to train: no bar
