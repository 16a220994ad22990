"""A fast front door: `--help`, `--version` and argument errors import no torch, and
`import lora_analysis` imports neither torch nor the training code until a name needs them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def imported_by(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime ARGS`; (the process, every module it imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=ENV,
                          timeout=120, cwd=REPO)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "lora_analysis" in modules, proc.stderr[-2000:]  # -X importtime did report
    return proc, modules


def torch_modules(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "torch" or m.startswith("torch.")}


@pytest.mark.parametrize("argv, returncode", [
    (["--help"], 0),
    (["--version"], 0),
    (["analyze", "--help"], 0),
    (["compare", "--help"], 0),
    (["train", "--help"], 0),
    (["sweep", "--help"], 0),
    (["reproduce", "--help"], 0),
    (["scan", "--help"], 0),
    (["scan", "root", "--workers", "0"], 2),
    (["analyze"], 2),                            # missing argument
    (["analyze", "x.safetensors", "--tau", "2"], 2),  # bad value
    (["compare", "a", "b", "--basis", "C"], 2),  # bad choice
    (["nonsense"], 2),
])
def test_cli_front_door_imports_no_torch(argv, returncode):
    proc, modules = imported_by(["-m", "lora_analysis", *argv])
    assert proc.returncode == returncode, proc.stderr[-2000:]
    assert not torch_modules(modules), sorted(torch_modules(modules))[:5]
    assert "lora_analysis.training.loop" not in modules


NOT_FOR_ANALYSIS = ("lora_analysis.training", "lora_analysis.lora", "lora_analysis.reproduce", "lora_analysis.plots",
                    "lora_analysis.scan", "transformers", "matplotlib", "peft")


def test_analyze_and_compare_import_only_what_the_analysis_needs(tmp_path):
    """`analyze` / `compare` of adapter files: torch and the analysis, no training stack, no
    transformers (only `--base` with a Hugging Face model directory may need it), no plotting."""
    import torch

    from lora_analysis import Adapter, LoraModule, save_adapter

    g = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        modules = {"layers.0.q": LoraModule(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 4.0)}
        save_adapter(Adapter(modules), tmp_path / f"a{seed}.safetensors")
    for argv in (["analyze", "a0.safetensors", "--format", "json", "--quiet"],
                 ["compare", "a0.safetensors", "a1.safetensors", "--quiet"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lora_analysis", *argv], capture_output=True,
                              text=True, env=ENV, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "lora_analysis.analysis.spectrum" in modules  # it did the work, and -X importtime reported it
        unneeded = sorted(m for m in modules if m.startswith(NOT_FOR_ANALYSIS))
        assert not unneeded, (argv[0], unneeded[:8])


def test_version():
    from lora_analysis.version import __version__

    proc = subprocess.run([sys.executable, "-m", "lora_analysis", "--version"], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lora-analysis {__version__}"
    from importlib.metadata import version

    assert version("lora-analysis") == __version__  # pyproject.toml takes its version from version.py


def test_import_is_lazy_and_names_load_their_own_subpackage_only():
    code = (
        "import sys\n"
        "import lora_analysis as la\n"
        "print('after import:', 'torch' in sys.modules, 'lora_analysis.training' in sys.modules)\n"
        "la.load_adapter, la.analyze_adapter, la.inject_lora, la.render_report\n"
        "print('after analysis names:', 'torch' in sys.modules, 'lora_analysis.training' in sys.modules)\n"
        "la.train\n"
        "print('after train:', 'lora_analysis.training.loop' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "after import: False False",
        "after analysis names: True False",
        "after train: True",
    ]


@pytest.mark.parametrize("package", ["lora_analysis", "lora_analysis.training"])
def test_lazy_exports_resolve_and_match_what_type_checkers_see(package):
    """Every exported name resolves to the object its module defines; the TYPE_CHECKING
    imports (what mypy and editors see) name exactly the same objects from the same modules."""
    import importlib

    module = importlib.import_module(package)
    exports = module._EXPORTS
    assert module.__all__ == sorted(exports)
    for name, where in exports.items():
        assert getattr(module, name) is getattr(importlib.import_module(where, package), name)
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    checked = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {alias.name: "." * node.level + node.module for node in checked.body for alias in node.names}
    assert seen == exports
