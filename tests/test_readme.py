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
    r4, r64 = table7["4"], table7["64"]
    quoted = [
        f"φ(1, 1) = {fig3['query']['phi_11']:.2f} for ΔW_q, {fig3['value']['phi_11']:.2f} for ΔW_v",
        f"φ(1, 1) = {fig4['query']['phi_11']:.2f} for ΔW_q, {fig4['value']['phi_11']:.2f} for ΔW_v",
        f"over i ≤ 8 at this layer: {fig4['query']['mean_phi_ii_top8']:.3f} (ΔW_q) and "
        f"{fig4['value']['mean_phi_ii_top8']:.3f} (ΔW_v), against a chance level of "
        f"{fig4['query']['chance']['mean_phi_ii_top8']:.3f}",
        f"directions ({r4['delta']:.3f} at r = 4) are at the level of random ones ({r4['random_mean']:.3f} ± "
        f"{r4['random_sd']:.3f})",
        f"at r = 64 they are above ({r64['delta']:.2f} against {r64['random_mean']:.2f} ± {r64['random_sd']:.3f})",
        f"capture {100 * r4['delta'] / r4['weight']:.0f} %",
        f"is {r4['amplification']:.1f} at r = 4 and {r64['amplification']:.2f} at r = 64",
    ]
    summary = prose.split("In short:")[1].split("![Figure 3]")[0].replace("−", "-")
    parts = {(claim["key"], part["label"]): part["test"] for claim in results["claims"] for part in claim["parts"]}
    for key in [("a", "ΔW_q"), ("a", "ΔW_v"), ("b", "ΔW_q − ΔW_v"), ("d", "more than random (r = 4)"),
                ("d", "more than random (r = 64)")]:
        test = parts[key]
        for phrase in (f"{test['median']:.3g}", f"{test['claim_side']}/{test['n']}"):
            assert phrase in summary, f"README's verdict summary does not say {phrase!r} for claim {key}"
    for phrase in quoted:
        assert phrase in prose, f"README Section 7 does not say {phrase!r} (figures/results.json does)"
