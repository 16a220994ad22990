"""Both notebooks run top to bottom (quick mode, reusing the session's quick reproduction)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["explore_adapter.ipynb", "reproduce_paper.ipynb"])
def test_notebook_runs(name, quick_reproduction, tmp_path, monkeypatch):
    config, _ = quick_reproduction
    monkeypatch.setenv("LORA_ANALYSIS_RUN_DIR", str(config.run_dir))
    monkeypatch.setenv("LORA_ANALYSIS_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel is another process: let it import this checkout even when it is not installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "store notebooks without outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    if name == "reproduce_paper.ipynb":
        assert (tmp_path / "out" / "fig3.png").exists() and "sign test" in text
        assert "barely trained adapters" in text  # quick-mode verdicts come with their caveat
    else:
        assert "LoRA parameters" in text and "amplification" in text
