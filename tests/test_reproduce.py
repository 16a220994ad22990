"""`lora-analysis reproduce --quick` end to end on the real MiniLM + Rotten Tomatoes."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_analysis.reproduce import Section7, render_all
from lora_analysis.reproduce.experiment import Runs
from lora_analysis.training import cell_name

pytestmark = pytest.mark.integration

FIGURES = ("fig3", "fig4", "fig6", "fig7", "fig8")
TABLES = ("table7", "rank_table")
REPO = Path(__file__).resolve().parents[1]


def test_every_figure_and_table_is_written(quick_reproduction):
    config, _ = quick_reproduction
    for name in FIGURES:
        assert (config.out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (config.out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    for name in TABLES:
        assert (config.out / f"{name}.md").read_text().count("|") > 10
    readme = (config.out / "README.md").read_text()
    for name in ("fig3.png", "fig4.png", "fig8.png", "Table 7", "holds here"):
        assert name in readme
    assert not list(config.out.glob(".*.tmp")), "a temporary file was left behind"


def test_tables_parse_and_numbers_are_in_range(quick_reproduction):
    config, results = quick_reproduction
    with open(config.out / "rank_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(config.ranks) * len(config.target_sets)
    for row in rows:
        accuracies = [float(row[f"seed{s}"]) for s in config.seeds]
        assert all(0.0 <= a <= 1.0 for a in accuracies)
        assert float(row["mean"]) == pytest.approx(np.mean(accuracies), rel=1e-5)  # 6 significant digits
    with open(config.out / "table7.csv") as f:
        table7 = list(csv.DictReader(f))
    assert {(int(r["r"]), r["directions"]) for r in table7} == {(r, d) for r in (4, 64) for d in ("delta_w", "w", "random")}
    for row in table7:
        values = [float(row[k]) for k in ("projection_norm", "weight_norm", "delta_norm", "amplification")]
        assert all(math.isfinite(v) and v >= 0 for v in values)
        # ‖UᵀWV‖_F ≤ ‖W‖_F for orthonormal U, V; W's own top directions capture the most
        assert float(row["projection_norm"]) <= float(row["weight_norm"]) + 1e-6
    w_rows = {int(r["r"]): float(r["projection_norm"]) for r in table7 if r["directions"] == "w"}
    assert w_rows[4] < w_rows[64]
    for figure in ("fig3", "fig4"):
        for target in config.targets:
            assert 0.0 <= results[figure][target]["phi_11"] <= 1.0
    saved = json.loads((config.out / "results.json").read_text())
    assert [c["holds"] for c in saved["claims"]] == [c["holds"] for c in results["claims"]]
    assert all(isinstance(c["holds"], bool) for c in saved["claims"])


def test_phi_grids_match_an_independent_oracle(quick_reproduction):
    """fig3's φ(1, 1) equals the squared cosine between the top right-singular vectors of A_8 and
    A_64, computed here from the raw factors with float64 numpy SVD."""
    config, results = quick_reproduction
    runs = Runs(config, {cell_name(r, s, t): config.run_dir / cell_name(r, s, t)
                         for r in config.ranks for s in config.seeds for t in config.target_sets})
    for target in config.targets:
        tops = []
        for r in (8, 64):
            adapter = runs.adapter(r, config.seeds[0])
            A = adapter[runs.module_name(adapter, target, runs.layer)].A.double().numpy()
            tops.append(np.linalg.svd(A, full_matrices=False)[2][0])
        assert results["fig3"][target]["phi_11"] == pytest.approx(float(tops[0] @ tops[1]) ** 2, abs=1e-6)


def test_rendering_is_deterministic_and_writes_only_where_asked(quick_reproduction, tmp_path):
    """render_all(s7, out) reads and writes `out` alone: the runs' own config names a folder
    that does not exist (render_all once read the README's tables from there)."""
    config, _ = quick_reproduction
    elsewhere = type(config)(**{**vars(config), "out": tmp_path / "never-written"})
    runs = Runs(elsewhere, {cell_name(r, s, t): config.run_dir / cell_name(r, s, t)
                            for r in config.ranks for s in config.seeds for t in config.target_sets})
    out = tmp_path / "again"
    render_all(Section7(runs), out, "lora-analysis reproduce --quick", progress=False)
    assert not elsewhere.out.exists()
    for name in ("table7.csv", "rank_table.csv", "results.json", "README.md", "fig3.png", "fig8.pdf"):
        assert (out / name).read_bytes() == (config.out / name).read_bytes(), name
    readme = (out / "README.md").read_text(encoding="utf-8")
    for table in ("table7.md", "rank_table.md"):
        assert (out / table).read_text(encoding="utf-8") in readme


def test_cli_reuses_finished_runs(quick_reproduction, tmp_path):
    config, _ = quick_reproduction
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    adapters = sorted(config.run_dir.glob("*/adapter_model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in adapters]
    proc = subprocess.run(
        [sys.executable, "-m", "lora_analysis", "reproduce", "--quick", "--quiet",
         "--run-dir", str(config.run_dir), "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "figures and tables written to" in proc.stdout
    assert proc.stdout.count("holds:") + proc.stdout.count("FAILS:") == len(json.loads((config.out / "results.json").read_text())["claims"])
    assert (tmp_path / "cli" / "table7.csv").read_bytes() == (config.out / "table7.csv").read_bytes()
    assert len(adapters) == 20 and [p.stat().st_mtime_ns for p in adapters] == stamps  # nothing retrained


def test_cli_bad_model_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_analysis", "reproduce", "--quick", "--model", str(tmp_path / "nope"),
         "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope" in proc.stderr
