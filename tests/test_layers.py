"""Data flows one way: no module imports from a package above its own.

The order (lowest first), as the project's rules state it:

    errors/fileio/naming/config → adapters → analysis (+ base_weights) → report/plots
    → reproduce/training → cli

with the small foundation modules beside errors/fileio/naming/config, and the LoRA core
(`lora`, the `torch.nn` side) beside analysis: it stands on adapters and base_weights, and
neither analysis nor base_weights may import it. Within one level only the listed imports are
allowed. Every import counts: at module level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_analysis"
ROOT = "lora_analysis"

LAYERS: list[set[str]] = [
    {"errors", "fileio", "naming", "config", "version", "lazy", "devices", "seeding", "assets", "outputs", "patterns"},
    {"adapters"},
    {"analysis", "base_weights", "model_pair", "lora"},
    {"report", "plots"},
    {"reproduce", "training", "scan"},
    {"study"},
    {"cli"},
    {"__main__"},
]
# (importer, imported) pairs allowed inside one level
SAME_LEVEL = {
    ("fileio", "errors"), ("naming", "errors"), ("outputs", "errors"), ("outputs", "fileio"),
    ("patterns", "errors"), ("config", "patterns"), ("assets", "errors"), ("devices", "errors"),
    ("analysis", "base_weights"), ("lora", "base_weights"),
    ("model_pair", "base_weights"), ("analysis", "model_pair"),
    ("report", "plots"),
    ("reproduce", "training"),
}
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """`lora_analysis.analysis.spectrum` → "analysis"; the package root → ROOT."""
    parts = module.split(".")
    assert parts[0] == ROOT, module
    return parts[1] if len(parts) > 1 else ROOT


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of this package's modules in `source`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != ROOT:
                continue
            if target == ROOT:  # `from .. import plots`: the names are the modules
                found += [(node.lineno, f"{ROOT}.{alias.name}") for alias in node.names
                          if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()]
                found += [(node.lineno, ROOT) for alias in node.names
                          if not ((PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file())]
            else:
                found.append((node.lineno, target))
    return found


def violations(source: str, module: str, is_package: bool) -> list[str]:
    importer = unit_of(module)
    if importer == ROOT:
        return []  # the package root re-exports everything (lazily)
    problems = []
    for line, target in imported_modules(source, module, is_package):
        imported = unit_of(target)
        if imported == importer:
            continue
        if imported == ROOT:
            problems.append(f"{module}:{line} imports the package root ({target}): an upward import")
        elif LEVEL[imported] > LEVEL[importer] or (
            LEVEL[imported] == LEVEL[importer] and (importer, imported) not in SAME_LEVEL
        ):
            problems.append(f"{module}:{line} ({importer}) imports {target} ({imported}): not below it")
    return problems


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_place_in_the_layers():
    units = {unit_of(module_name(path)) for path in package_modules()} - {ROOT}
    assert units <= set(LEVEL), f"place these in LAYERS: {sorted(units - set(LEVEL))}"


def test_no_module_imports_from_a_higher_layer():
    problems = []
    for path in package_modules():
        problems += violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_plots_draw_arrays_and_labels_only():
    """Figures take plain arrays and labels: plots imports nothing that computes them."""
    source = (PACKAGE / "plots.py").read_text(encoding="utf-8")
    imported = {unit_of(target) for _, target in imported_modules(source, "lora_analysis.plots", False)}
    assert imported <= LAYERS[0], imported


def test_adapters_know_no_torch_nn_models():
    """Adapters are data and file formats: no `torch.nn`, no LoRA core."""
    for path in (PACKAGE / "adapters").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "torch.nn" or n.startswith("torch.nn.") for n in names), f"{path}:{node.lineno}"


@pytest.mark.parametrize("module, source, expected", [
    ("lora_analysis.adapters.files", "from ..lora import inject_lora", "imports lora_analysis.lora (lora)"),
    ("lora_analysis.base_weights", "from .lora.layer import LoraLinear", "imports lora_analysis.lora.layer (lora)"),
    ("lora_analysis.plots", "def f():\n    from .report.grouping import common_prefix", "(plots) imports lora_analysis.report.grouping"),
    ("lora_analysis.report.build", "from .. import __version__", "imports the package root"),
    ("lora_analysis.training.loop", "import lora_analysis.reproduce", "(training) imports lora_analysis.reproduce"),
    ("lora_analysis.naming", "from .config import ALL_LINEAR", "(naming) imports lora_analysis.config"),
])
def test_the_checker_catches_upward_imports(module, source, expected):
    """The rule is not vacuous: each of these imports (several existed once) is reported."""
    found = violations(source, module, is_package=False)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_accepts_downward_and_listed_same_level_imports():
    assert violations("from ..adapters import Adapter\nfrom ..base_weights import BaseWeights",
                      "lora_analysis.analysis.analyze", is_package=False) == []
    assert violations("from .. import plots\nfrom .grouping import model_order",
                      "lora_analysis.report.html", is_package=False) == []
