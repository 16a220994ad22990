"""`resize` and `extract` verified by accuracy: `--eval` reports exactly what `evaluate` gives on
the original and on the written adapter; `--sweep-ranks` tabulates energy kept (against the
float64 SVD of the materialized ΔW) and accuracy per rank; refusals are one line."""

from __future__ import annotations

import json
import math
import shutil
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from training_fixtures import save_tiny_bert, write_sentiment_csv

from lora_analysis import evaluate, load_adapter, train
from lora_analysis.analysis.resize import ModuleResize, RankRule, ResizeResult
from lora_analysis.cli.main import main
from lora_analysis.training.evaluation import run_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run (r = 4, query/value) and a full fine-tune of the tiny BERT, a few steps each."""
    root = tmp_path_factory.mktemp("resize_eval")
    bert, csv = save_tiny_bert(root / "bert"), write_sentiment_csv(root / "sentiment.csv", n=160)
    common = dict(model=str(bert), data=str(csv), steps=8, batch_size=16, progress=False, eval_batch_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only wait on each other on a busy machine
    try:
        train(**common, r=4, alpha=8.0, lr=5e-2, output_dir=root / "lora")
        train(**common, method="full", lr=5e-3, output_dir=root / "full")
    finally:
        torch.set_num_threads(threads)
    return {"bert": bert, "csv": csv, "lora": root / "lora", "full": root / "full"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-150, 1e150), st.floats(0.0, 1.0)), min_size=1, max_size=6))
def test_energy_kept_over_modules_is_exact_over_the_float_range(modules):
    """Σ kept_m ‖ΔW_m‖² / Σ ‖ΔW_m‖² and √(Σ err_m² / Σ ‖ΔW_m‖²) against exact rational arithmetic,
    norms from 1e-150 to 1e150 (their squares overflow or underflow float64)."""
    cuts = {f"m{i}": ModuleResize(f"m{i}", "lora", (4, 4), 2, 2, 1, norm, norm * math.sqrt(1 - kept), kept, 16, 8)
            for i, (norm, kept) in enumerate(modules)}
    result = ResizeResult(None, cuts, RankRule("rank", 1))  # type: ignore[arg-type]
    weights = [Fraction(m.frobenius) ** 2 for m in cuts.values()]
    expected = sum(w * Fraction(m.energy_kept) for w, m in zip(weights, cuts.values())) / sum(weights)
    assert result.energy_kept == pytest.approx(float(expected), rel=1e-12, abs=1e-300)
    error = sum(Fraction(m.error) ** 2 for m in cuts.values()) / sum(weights)
    with localcontext() as context:  # √ of the exact ratio, in decimal: no exponent limit
        context.prec = 40
        root = Decimal(error.numerator).sqrt() / Decimal(error.denominator).sqrt()
    assert result.relative_error == pytest.approx(float(root), rel=1e-12, abs=0)


def report(capsys, *argv: str) -> dict:
    assert main([*argv, "--format", "json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_resize_eval_reports_evaluate_on_the_original_and_on_the_written_adapter(runs, tmp_path, capsys):
    out = tmp_path / "r2"
    doc = report(capsys, "resize", str(runs["lora"]), "--rank", "2", "-o", str(out), "--eval")
    recipe = run_config(runs["lora"])
    assert doc["evaluation"]["original"] == evaluate(runs["lora"], progress=False).metrics
    assert doc["evaluation"]["resized"] == evaluate(out, recipe, progress=False).metrics
    assert doc["evaluation"]["examples"] == 16 and doc["evaluation"]["resized"] != doc["evaluation"]["original"]
    assert set(load_adapter(out).extra_tensors) == set(load_adapter(runs["lora"]).extra_tensors)  # the head kept

    assert main(["resize", str(runs["lora"]), "--rank", "2", "-o", str(tmp_path / "text"), "--eval", "--quiet"]) == 0
    text = capsys.readouterr().out
    accuracy = doc["evaluation"]["resized"]["val_accuracy"]
    assert f"resized val_accuracy {accuracy:.4f}" in text and "validation (16 examples of" in text


def test_extract_eval_carries_the_fine_tuned_head_and_reports_evaluate(runs, tmp_path, capsys):
    out = tmp_path / "x"
    doc = report(capsys, "extract", str(runs["full"]), "--base", str(runs["bert"]), "--rank", "2", "-o", str(out), "--eval")
    assert doc["evaluation"]["original"] == evaluate(runs["full"], progress=False).metrics
    assert doc["evaluation"]["resized"] != doc["evaluation"]["original"]  # rank 2 of a full ΔW: not the same model
    written = load_adapter(out)
    assert set(written.extra_tensors) == {"classifier.weight", "classifier.bias"}
    assert doc["evaluation"]["resized"] == evaluate(out, run_config(runs["full"]), base=runs["bert"], progress=False).metrics

    weights = runs["full"] / "model.safetensors"  # a weights file: no model to evaluate the original as
    assert main(["extract", str(weights), "--base", str(runs["bert"]), "--rank", "2", "-o", str(tmp_path / "y"), "--eval",
                 "--quiet"]) == 2
    assert "give its model directory" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_sweep_ranks_energy_against_the_oracle_and_accuracy_of_each_written_adapter(runs, tmp_path, capsys):
    curve, out = tmp_path / "curve.png", tmp_path / "sweep"
    doc = report(capsys, "resize", str(runs["lora"]), "--sweep-ranks", "1", "2", "4", "--eval", "-o", str(out),
                 "--plot", str(curve))
    rows = doc["ranks"]
    assert [r["rank"] for r in rows] == [1, 2, 4]
    kept = [r["energy_kept"] for r in rows]
    assert kept == sorted(kept) and kept[-1] == pytest.approx(1.0, abs=1e-12)  # r = 4: nothing cut
    spectra = [torch.linalg.svdvals(update.delta_weight(torch.float64)).numpy()
               for update in load_adapter(runs["lora"]).modules.values()]
    total = sum(float(np.square(S).sum()) for S in spectra)
    for row in rows:  # energy kept over all modules against the materialized ΔW's float64 SVD
        expected = sum(float(np.square(S[: row["rank"]]).sum()) for S in spectra) / total
        assert row["energy_kept"] == pytest.approx(expected, rel=1e-9)
        assert row["relative_error"] == pytest.approx(np.sqrt(max(1 - expected, 0.0)), abs=1e-6)
    recipe = run_config(runs["lora"])
    for row in rows[:2]:
        assert row["output"] == str(out / f"rank-{row['rank']}")
        assert row["metrics"] == evaluate(row["output"], recipe, progress=False).metrics
    assert doc["evaluation"]["original"] == evaluate(runs["lora"], progress=False).metrics
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # again into the same directory: refused before any work, unless --force
    argv = ["resize", str(runs["lora"]), "--sweep-ranks", "1", "-o", str(out), "--quiet"]
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    plain = tmp_path / "energy.svg"
    assert main(["resize", str(runs["lora"]), "--sweep-ranks", "1", "2", "--plot", str(plain), "--quiet"]) == 0
    table = capsys.readouterr().out  # a table and an energy-only figure, no adapter
    assert "energy kept" in table and "val_accuracy" not in table and b"<svg" in plain.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "energy.svg", "sweep"]


@pytest.mark.parametrize("extra, message", [
    (["--rank", "2", "-o", "{tmp}/o", "--eval"], "pass --data DATA (and --task) and --model MODEL"),
    (["--rank", "2", "-o", "{tmp}/o", "--eval", "--data", "{csv}"], "pass --data DATA (and --task) and --model MODEL"),
    (["--rank", "2", "-o", "{tmp}/o", "--data", "{csv}"], "--data chooses what --eval evaluates on: pass --eval too"),
    (["--rank", "2", "-o", "{tmp}/o", "--eval", "--data", "{tmp}/missing.csv", "--model", "{bert}"], "no such data file"),
    (["--rank", "2"], "-o OUT is required"),
    (["--rank", "2", "-o", "{tmp}/o", "--plot", "{tmp}/p.png"], "pass --sweep-ranks R ... too"),
    (["--sweep-ranks", "1", "2", "-o", "{tmp}/o.safetensors"], "give -o a directory"),
    (["--sweep-ranks", "1", "--plot", "{tmp}/p.gif"], "unsupported figure format"),
])
def test_refusals_are_one_line(runs, tmp_path, capsys, extra, message):
    alone = tmp_path / "alone"  # the adapter without its run's metrics.json
    alone.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(runs["lora"] / name, alone / name)
    argv = [a.format(tmp=tmp_path, csv=runs["csv"], bert=runs["bert"]) for a in extra]
    assert main(["resize", str(alone), *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.png").exists()


def test_eval_on_data_with_model_evaluates_an_adapter_without_its_run(runs, tmp_path, capsys):
    alone = tmp_path / "alone"  # the adapter without its run's metrics.json
    alone.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(runs["lora"] / name, alone / name)
    task = {"data": str(runs["csv"]), "model": str(runs["bert"])}
    doc = report(capsys, "resize", str(alone), "--rank", "4", "-o", str(tmp_path / "r4"), "--eval",
                 "--data", task["data"], "--model", task["model"])
    assert doc["evaluation"]["original"] == evaluate(alone, progress=False, **task).metrics
    assert doc["evaluation"]["resized"] == evaluate(tmp_path / "r4", progress=False, **task).metrics
    # rank 4 of a rank-4 adapter is the same ΔW (to float32 rounding): the same predictions
    assert doc["evaluation"]["resized"]["val_accuracy"] == doc["evaluation"]["original"]["val_accuracy"]
