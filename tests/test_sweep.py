"""Sweeps: one adapter per (rank, seed, targets) cell, a manifest, skip finished, resume unfinished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import adapter_bytes, save_tiny_bert, write_sentiment_csv

from lora_analysis import LoraAnalysisError, TrainConfig, load_adapter, run_sweep, train
from lora_analysis.training import cell_name, loop

REPO = Path(__file__).resolve().parents[1]
GRID = dict(ranks=[1, 4], seeds=[0], target_sets=[["query", "value"], ["query"]])
NAMES = ["r1-s0-query_value", "r4-s0-query_value", "r1-s0-query", "r4-s0-query"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> TrainConfig:
    root = tmp_path_factory.mktemp("sweep_assets")
    return TrainConfig(
        model=str(save_tiny_bert(root / "bert")), data=str(write_sentiment_csv(root / "data.csv")),
        steps=6, batch_size=8, lr=0.05, checkpoint_every=2, progress=False,
    )


def test_cell_names_are_stable_and_distinct():
    assert cell_name(8, 0, ["query", "value"]) == "r8-s0-query_value"
    assert cell_name(64, 1, "all-linear") == "r64-s1-all-linear"
    a, b = cell_name(2, 0, r".*\.query"), cell_name(2, 0, r".*\.(query)")
    assert a.startswith("r2-s0-re-query-") and a != b


def test_sweep_writes_cells_and_manifest_then_skips_them(base, tmp_path):
    result = run_sweep(base, tmp_path, **GRID)
    assert list(result.cells) == NAMES
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["grid"] == {"ranks": [1, 4], "seeds": [0], "target_sets": [["query", "value"], ["query"]]}
    assert manifest["config"]["steps"] == 6 and "r" not in manifest["config"]
    assert {"torch", "transformers", "lora_analysis", "python"} <= set(manifest["versions"])
    for name, path in result.cells.items():
        cell = manifest["cells"][name]
        assert cell["status"] == "finished" and cell["path"] == name and cell["wall_time_s"] > 0
        assert 0 <= cell["final"]["val_accuracy"] <= 1
        adapter = load_adapter(path)
        assert set(adapter.ranks.values()) == {cell["r"]}
        assert {n.rsplit(".", 1)[-1] for n in adapter.modules} == set(cell["targets"])
        assert cell["parameters"]["lora"] == adapter.num_parameters()
    # A cell is exactly the standalone run with that rank, seed and targets.
    alone = tmp_path / "alone"
    train(base, r=4, targets=["query"], output_dir=alone)
    assert adapter_bytes(alone) == adapter_bytes(result.cells["r4-s0-query"])

    stamps = {n: (p / "adapter_model.safetensors").stat().st_mtime_ns for n, p in result.cells.items()}
    again = run_sweep(base, tmp_path, **GRID)
    assert {n: (p / "adapter_model.safetensors").stat().st_mtime_ns for n, p in again.cells.items()} == stamps
    assert again.manifest["cells"] == manifest["cells"]


def test_interrupted_sweep_resumes_the_unfinished_cell(base, tmp_path, monkeypatch):
    save = loop.save_checkpoint
    saved = []

    def crash_in_third_cell(*args, **kwargs):
        save(*args, **kwargs)
        saved.append(args[0])
        if len(saved) == 5:  # cells checkpoint at steps 2 and 4: this is the 3rd cell's first
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", crash_in_third_cell)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(base, tmp_path, **GRID)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [manifest["cells"][n]["status"] for n in NAMES] == ["finished", "finished", "pending", "pending"]
    assert (tmp_path / NAMES[2] / "checkpoint.pt").is_file()

    result = run_sweep(base, tmp_path, **GRID)
    assert all(cell["status"] == "finished" for cell in result.manifest["cells"].values())
    train(base, r=1, targets=["query"], output_dir=tmp_path / "alone")
    assert adapter_bytes(tmp_path / "alone") == adapter_bytes(result.cells[NAMES[2]])


def test_sweep_refuses_a_run_dir_made_with_another_recipe(base, tmp_path):
    run_sweep(base, tmp_path, ranks=[1], seeds=[0], target_sets=[["query"]])
    with pytest.raises(LoraAnalysisError, match=r"manifest\.json: cannot resume.*steps: 6 -> 7"):
        run_sweep(TrainConfig(**{**base.to_dict(), "steps": 7}), tmp_path, ranks=[1], seeds=[0], target_sets=[["query"]])
    with pytest.raises(LoraAnalysisError, match="repeats a cell"):
        run_sweep(base, tmp_path, ranks=[1, 1], seeds=[0], target_sets=[["query"]])


def test_sweep_cli(base, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lora_analysis", "sweep", "--model", base.model, "--data", base.data, "--steps", "3",
           "--batch-size", "4", "--lr", "0.05", "--ranks", "2", "--seeds", "0", "1", "--targets", "query,value", "query",
           "--output-dir", str(tmp_path), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["r2-s0-query_value", "r2-s1-query_value", "r2-s0-query", "r2-s1-query"]
    assert lines[-1] == f"manifest: {tmp_path / 'manifest.json'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", "r2-s0-query", "r2-s0-query_value", "r2-s1-query", "r2-s1-query_value"])
    # The command trains exactly what the API trains with these settings (the API's training
    # learns: test_train), every factor moved from its init (B starts at 0), and the lines
    # printed are the manifest's numbers.
    api = run_sweep(TrainConfig(**{**base.to_dict(), "steps": 3, "batch_size": 4, "lr": 0.05}), tmp_path / "api",
                    ranks=[2], seeds=[0, 1], target_sets=[["query", "value"], ["query"]])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for line, (name, path) in zip(lines, api.cells.items()):
        assert adapter_bytes(tmp_path / name) == adapter_bytes(path), name
        assert all(torch.count_nonzero(m.B) == m.B.numel() for m in load_adapter(tmp_path / name).modules.values())
        final = manifest["cells"][name]["final"]
        assert line.startswith(f"{name}: val_accuracy {final['val_accuracy']:.4f}, ")
