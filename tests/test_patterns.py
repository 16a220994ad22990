"""User regexes (`lora_analysis.patterns`): Python's meaning (PEFT's), RE2's linear time.

Oracles: Python's `re` itself on patterns and names small enough for backtracking, and PEFT's
own `get_pattern_key`; the ReDoS cases run in a subprocess under a limit that Python's `re`
would overrun by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_analysis.cli import main
from lora_analysis.config import LoraConfig
from lora_analysis.patterns import PatternError, compile_pattern, fullmatch, pattern_value, peft_key

ROOT = Path(__file__).resolve().parents[1]

# Pieces of Python regex syntax whose meaning differs between engines or is easy to get wrong.
ATOMS = ["a", "b", ".", r"\.", "_", "1", "é", "٣", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", "[ab]", "[^a]",
         r"[\d.]", r"[^\w]", "[a-c]", r"[\s_]", r"\n", " ", r"\t", "$", "^", r"\A", r"\Z", r"\b", r"\B", "(?s:.)",
         "(?a:\\w)", "x{,2}", "a{2}", "[]a]", r"\x00"]
NAME_ALPHABET = "ab._1é٣ \t\x0b\x1c\u2003xA"


@st.composite
def regexes(draw, depth: int = 0) -> str:
    if depth >= 2 or draw(st.booleans()):
        return draw(st.sampled_from(ATOMS))
    kind = draw(st.sampled_from(["seq", "alt", "group", "star", "plus", "opt", "count", "lazy"]))
    inner = draw(regexes(depth + 1))
    if kind == "seq":
        return inner + draw(regexes(depth + 1))
    if kind == "alt":
        return f"{inner}|{draw(regexes(depth + 1))}"
    if kind == "group":
        return f"({inner})"
    if kind == "count":
        low = draw(st.integers(0, 2))
        return f"(?:{inner}){{{low},{low + draw(st.integers(0, 2))}}}"
    return f"(?:{inner})" + {"star": "*", "plus": "+", "opt": "?", "lazy": "*?"}[kind]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=regexes(), names=st.lists(st.text(NAME_ALPHABET, max_size=6), min_size=1, max_size=6))
def test_same_answer_as_python_re(pattern, names):
    """Every pattern is either matched exactly as Python's `re` matches it, or refused."""
    try:
        compiled = compile_pattern(pattern)
    except PatternError:
        return
    for name in names:
        try:
            ours = (compiled.match(name), compiled.fullmatch(name))
        except PatternError:  # a name it cannot match exactly (line break; \b on non-ASCII)
            continue
        assert ours == (re.match(pattern, name) is not None, re.fullmatch(pattern, name) is not None), (pattern, name)


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(regexes(), min_size=1, max_size=3, unique=True),
       name=st.text("ab._1xé", max_size=8))
def test_same_value_as_peft(keys, name):
    """`pattern_value` is PEFT's rank_pattern lookup: rank_pattern.get(get_pattern_key(keys, name), r)."""
    other = pytest.importorskip("peft.utils.other")
    patterns = {key: i + 2 for i, key in enumerate(keys)}
    try:
        ours = pattern_value(patterns, name, 1)
    except PatternError:
        return
    assert ours == patterns.get(other.get_pattern_key(patterns.keys(), name), 1), (patterns, name)


@pytest.mark.parametrize("pattern, reason", [
    ("(a", "not a valid regex"), (r"(a)\1", "backreference"), ("(?=a)b", "lookahead"), ("(?<!a)b", "lookahead"),
    ("(?i)a", "case-insensitive"), ("(?m)a", "multi-line"), ("a{1001}", "1000"), ("(?>a)", "atomic"),
    ("a++", "possessive"), ("(a)?(?(1)b|c)", "conditional"),
])
def test_refused_with_the_reason(pattern, reason):
    with pytest.raises(PatternError, match=re.escape(reason) if reason != "lookahead" else "lookahead"):
        compile_pattern(pattern)


def test_peft_semantics_details():
    assert pattern_value({"query": 4}, "bert.encoder.layer.0.attention.self.query", 8) == 4
    assert pattern_value({"query": 4}, "bert.encoder.layer.0.attention.self.xquery", 8) == 8  # dot boundary
    assert pattern_value({r"layer\.1\..*": 4, "query": 2}, "encoder.layer.1.query", 8) == 4  # first key wins
    assert pattern_value({"a+b": 3}, "a+b", 8) == 3  # no regex match, but the key equals the name
    assert pattern_value({"x)|(.*": 5}, "anything", 8) == 5  # pasted into PEFT's template as text
    assert fullmatch(r".*\.query", "encoder.query") and not fullmatch("query", "encoder.query")
    assert LoraConfig(r=8, rank_pattern={"q": 2}).rank_for("m.q") == 2


def test_names_it_cannot_match_exactly_are_refused():
    with pytest.raises(PatternError, match="line break"):
        peft_key("q").match("m.q\n")
    with pytest.raises(PatternError, match="ASCII"):
        compile_pattern(r"\bq").match("é.q")
    assert compile_pattern(r".*\bq").match("m q") and not compile_pattern(r".*\Bq").match("m q")


REDOS = r"""
import sys, time
from lora_analysis.patterns import pattern_value, fullmatch
name = "x." + "a" * 100_000
assert pattern_value({"(a*)*b": 3, "(a|aa)+c": 4, "(.*a){12}z": 5}, name, 1) == 1
assert not fullmatch("(a|a)*b", "a" * 100_000)
print("ok")
"""


def test_catastrophic_patterns_return_at_once():
    """Python's `re` needs ~2^100000 steps here; RE2 a few milliseconds. The limit only catches a hang."""
    result = subprocess.run([sys.executable, "-c", REDOS], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
    assert result.stderr == ""  # RE2 prints nothing of its own


def _adapter_with_patterns(tmp_path: Path, rank_pattern: dict, name: str = "m.query") -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({f"base_model.model.{name}.lora_A.weight": torch.ones(2, 4),
               f"base_model.model.{name}.lora_B.weight": torch.ones(3, 2)}, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], "rank_pattern": rank_pattern}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("key, reason", [("(a", "not a valid regex"), (r"(q)\3", "backreference"),
                                         ("(?<=m\\.)query", "lookahead")])
def test_cli_refuses_a_bad_pattern_naming_the_file_and_the_key(tmp_path, capfd, key, reason):
    folder = _adapter_with_patterns(tmp_path, {key: 2})
    assert main(["analyze", str(folder), "--quiet"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1
    assert str(folder / "adapter_config.json") in err and "rank_pattern key" in err and key in err and reason in err


def test_cli_with_a_catastrophic_pattern_and_a_long_name_finishes(tmp_path):
    folder = _adapter_with_patterns(tmp_path, {"(a*)*b": 5}, name="m." + "a" * 5000)
    result = subprocess.run([sys.executable, "-m", "lora_analysis", "analyze", str(folder), "--quiet", "--format", "json"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["modules"]["m." + "a" * 5000]["r"] == 2
