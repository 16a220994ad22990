"""The README's study section is generated from the committed figures/study/results.json.

Before the full study is committed the block holds `PLACEHOLDER`; once results.json exists the
block must be `render.summary(results)` verbatim (numbers included), so a re-run study that
changes a number fails here until the README is regenerated:
`LORA_ANALYSIS_UPDATE_README=1 python -m pytest tests/test_study_readme.py`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lora_analysis.study.render import summary

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "figures" / "study" / "results.json"
BLOCK = re.compile(r"(<!-- figures/study/results.json -->\n)(?P<body>.*?)(<!-- end figures/study/results.json -->)", re.S)
PLACEHOLDER = ("(not rendered yet: run `lora-analysis study`, then "
               "`LORA_ANALYSIS_UPDATE_README=1 python -m pytest tests/test_study_readme.py`)\n")
UPDATE = os.environ.get("LORA_ANALYSIS_UPDATE_README") == "1"


def test_readme_study_section_matches_results():
    text = README.read_text(encoding="utf-8")
    match = BLOCK.search(text)
    assert match, "README.md lacks the <!-- figures/study/results.json --> block"
    expected = summary(json.loads(RESULTS.read_text(encoding="utf-8"))) if RESULTS.is_file() else PLACEHOLDER
    if UPDATE:
        README.write_text(text[: match.start("body")] + expected + text[match.end("body"):], encoding="utf-8")
        return
    assert match.group("body") == expected


def test_summary_quotes_every_number_and_verdict():
    results = {"questions": {"depth": {
        "number": 3, "question": "Q?", "expectation": "E.", "source": "S", "measurement": "M 0.5. N 2.",
        "verdicts": [{"verdict": "holds", "effect": "mean ρ 0.7", "rule": "R"}]}}}
    text = summary(results)
    assert "![depth](figures/study/depth.png)" in text
    assert "M 0.5. N 2." in text and "- holds: mean ρ 0.7" in text and "**3. Q?**" in text
