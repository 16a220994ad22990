"""The README's examples are real outputs and stay true.

- Each `<!-- example: COMMAND -->` block holds `$ COMMAND` and the stdout it prints; the test
  runs COMMAND on the quick reproduction's adapters (what `lora-analysis reproduce --quick`
  trains into `runs/reproduce-minilm-rotten_tomatoes-quick/`) and compares it, numbers to
  within a rounding of their last printed digit (another BLAS may move float32 results there).
- Each `<!-- figures/NAME.md -->` block (Table 7; the verdicts, `claims.md`, once committed)
  is that committed file, verbatim.

`LORA_ANALYSIS_UPDATE_README=1 python -m pytest tests/test_readme.py` rewrites both from the
real outputs instead of comparing.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICK_RUN_DIR = Path("runs/reproduce-minilm-rotten_tomatoes-quick")
EXAMPLE = re.compile(r"<!-- example: (?P<command>.+?) -->\n```\n\$ (?P=command)\n(?P<output>.*?)```\n", re.S)
COMMITTED = re.compile(r"<!-- figures/(?P<name>[\w.]+\.md) -->\n(?P<table>.*?)<!-- end figures/(?P=name) -->", re.S)
NUMBER = re.compile(r"^[-+]?\d[\d,]*\.?\d*(e[-+]?\d+)?%?$")
UPDATE = os.environ.get("LORA_ANALYSIS_UPDATE_README") == "1"


def _run(command: str, cwd: Path, cache: Path) -> str:
    args = shlex.split(command)
    assert args[0] == "lora-analysis", command
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_ANALYSIS_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "lora_analysis", *args[1:], "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _same(expected: str, actual: str) -> bool:
    """Token by token; numbers equal within one unit of their last printed digit."""
    a, b = expected.split(), actual.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if not (NUMBER.match(x) and NUMBER.match(y)):
            return False
        fx, fy = (float(t.replace(",", "").rstrip("%")) for t in (x, y))
        digits = x.replace(",", "").rstrip("%").split("e")[0]
        if "." not in digits:
            return False  # counts and shapes are exact
        last = 10.0 ** -len(digits.split(".")[1])
        if abs(fx - fy) > 1.01 * last * (10.0 ** int(x.split("e")[1]) if "e" in x else 1.0):
            return False
    return True


@pytest.mark.integration
def test_readme_examples_are_real_outputs(quick_reproduction, tmp_path):
    config, _ = quick_reproduction
    (tmp_path / QUICK_RUN_DIR).parent.mkdir(parents=True)
    (tmp_path / QUICK_RUN_DIR).symlink_to(config.run_dir.resolve(), target_is_directory=True)
    text = README.read_text()
    examples = list(EXAMPLE.finditer(text))
    assert examples, "the README shows no example output"
    for match in examples:
        actual = _run(match["command"], tmp_path, tmp_path / "cache")
        if UPDATE:
            text = text.replace(match.group(0), match.group(0).replace(match["output"], actual))
        else:
            assert _same(match["output"], actual), f"README example is stale; it now prints:\n{actual}"
    if UPDATE:
        README.write_text(text)


def test_readme_tables_are_the_committed_ones():
    """Each `<!-- figures/NAME -->` block is that committed file, verbatim; the verdict table
    (figures/claims.md) is shown exactly when it is committed."""
    text = README.read_text(encoding="utf-8")
    blocks = list(COMMITTED.finditer(text))
    assert blocks, "the README shows no committed table"
    shown = {match["name"] for match in blocks}
    assert ("claims.md" in shown) == (REPO / "figures" / "claims.md").exists()
    for match in reversed(blocks):
        committed = (REPO / "figures" / match["name"]).read_text(encoding="utf-8")
        if UPDATE:
            text = text[: match.start("table")] + committed + text[match.end("table"):]
        else:
            assert match["table"] == committed, f"README's copy of figures/{match['name']} is stale"
    if UPDATE:
        README.write_text(text, encoding="utf-8")


def test_number_comparison():
    assert _same("a 0.1133 b 5.2%", "a 0.1134 b 5.3%") and not _same("a 0.1133", "a 0.1136")
    assert _same("73,728", "73,728") and not _same("73,728", "73,729")
    assert _same("1.5e-4", "1.6e-4") and not _same("1.5e-4", "1.8e-4") and not _same("q", "v")


def test_readme_section7_prose_quotes_the_committed_results():
    """The numbers the README's Section 7 prose quotes are figures/results.json's, as rounded
    there. Regenerating figures/ changes results.json: rewrite the prose and this list with it."""
    import json

    results = json.loads((REPO / "figures" / "results.json").read_text(encoding="utf-8"))
    section = README.read_text(encoding="utf-8").split("## What the reproduction shows")[1].split("\n## ")[0]
    prose = " ".join(section.split())  # line breaks do not matter
    fig3, fig4, table7 = results["fig3"], results["fig4"], results["table7"]
    assert fig4["query"]["top_k"] == fig4["value"]["top_k"] == 64  # the prose says "over i ≤ 64"
    quoted = [
        f"φ(1, 1) = {fig3['query']['phi_11']:.2f} for ΔW_q, {fig3['value']['phi_11']:.2f} for ΔW_v",
        f"φ(1, 1) = {fig4['query']['phi_11']:.2f} for ΔW_q, {fig4['value']['phi_11']:.2f} for ΔW_v",
        f"{fig4['query']['top_k_mean']:.3f} (ΔW_q) and {fig4['value']['top_k_mean']:.3f} (ΔW_v)",
        f"chance level of {(64 + 1) / 2 / 384:.3f}",
        f"√E = {table7['4']['random_expected']:.3f} at r = 4 and {table7['64']['random_expected']:.2f} at r = 64",
        f"directions ({table7['4']['delta']:.3f}) are at the level of random ones",
        f"capture {100 * table7['4']['delta'] / table7['4']['weight']:.0f} %",
        f"is {table7['4']['amplification']:.1f} at r = 4 and {table7['64']['amplification']:.2f} at r = 64",
    ]
    for phrase in quoted:
        assert phrase in prose, f"README Section 7 does not say {phrase!r} (figures/results.json does)"
