"""`lora-analysis study --quick` end to end (MiniLM, three tasks, 4 steps per cell), one run
shared by every assertion; the verdict rules themselves are tested in test_study_rules.py."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lora_analysis.analysis.stats import sign_test
from lora_analysis.study.questions import QUESTIONS
from lora_analysis.study.render import WRITTEN_FORMATS
from lora_analysis.study.verdicts import INCONCLUSIVE, TRIVIAL, trend_test

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VERDICTS = ("holds", "does not hold", INCONCLUSIVE, TRIVIAL)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One `lora-analysis study --quick` through the command line's main(), in-process:
    (runs root, output folder, stdout, results.json)."""
    from lora_analysis.cli.main import main

    root = tmp_path_factory.mktemp("study")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["study", "--quick", "--runs-root", str(root / "runs"), "--quiet"])
    assert code == 0
    out = root / "runs" / "study-minilm-quick" / "figures"
    return root, out, stdout.getvalue(), json.loads((out / "results.json").read_text())


def _finite_numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _finite_numbers(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _finite_numbers(v, f"{path}/{i}")
    elif isinstance(x, float):
        yield path, x


def test_every_output_is_written(quick_study):
    _, out, stdout, results = quick_study
    for question in QUESTIONS:
        for fmt in WRITTEN_FORMATS:
            assert (out / f"{question.KEY}.{fmt}").stat().st_size > 1000
    assert (out / "README.md").is_file()
    assert sorted(results["questions"], key=lambda k: results["questions"][k]["number"]) == [q.KEY for q in QUESTIONS]
    assert "figures and results written to" in stdout
    root = quick_study[0]
    assert out.is_relative_to(root / "runs")  # a quick study writes beside its runs, never into figures/


def test_results_are_strict_json_with_finite_numbers(quick_study):
    _, out, _, results = quick_study
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    for path, value in _finite_numbers(results):
        assert math.isfinite(value), path


def test_readme_states_each_question_expectation_verdict_and_rule(quick_study):
    _, out, _, results = quick_study
    readme = (out / "README.md").read_text()
    assert "Quick run" in readme and "Where the time went" in readme
    for key, q in results["questions"].items():
        assert q["question"] in readme and q["expectation"] in readme and q["source"] in readme
        assert f"![{key}]({key}.png)" in readme
        assert q["verdicts"], key
        for v in q["verdicts"]:
            assert v["verdict"] in VERDICTS
            assert f"**{v['verdict']}** — {v['effect']}" in readme and v["rule"] in readme


def test_full_ft_spectrum_numbers_and_verdicts(quick_study):
    _, _, _, results = quick_study
    q = results["questions"]["full_ft_spectrum"]["numbers"]
    units = q["units"]
    assert len(units) == 6 * 6 * 2  # projection types × layers × seeds
    for u in units:
        d = min(u["shape"])
        assert 1 <= u["energy_rank_90"] <= u["energy_rank_99"] <= d
        assert u["fraction_90"] == pytest.approx(u["energy_rank_90"] / d, rel=1e-5)
        assert 0 < u["null_fraction_90"] < u["null_fraction_99"] < 1
    verdicts = results["questions"]["full_ft_spectrum"]["verdicts"]
    test = sign_test([u["ratio_90"] for u in units], 1.0, "less")
    assert verdicts[0]["verdict"] == {"inconclusive": INCONCLUSIVE}.get(test.verdict, test.verdict)
    assert f"{test.claim_side}/{test.n} units" in verdicts[0]["effect"]


def test_lora_vs_full_numbers_and_verdicts(quick_study):
    _, _, _, results = quick_study
    numbers = results["questions"]["lora_vs_full"]["numbers"]
    assert set(numbers["by_rank"]) == {"8", "64"}
    for data in numbers["by_rank"].values():
        assert len(data["units"]) == 6 * 2 * 2  # layers × {q, v} × seeds
        for u in data["units"]:
            assert u["seed"] == u["full_seed"]  # the stated pairing
            for space in ("output", "input"):
                assert 0 <= u[space] <= 1 and 0 <= u[f"{space}_phi11"] <= 1
    for null in numbers["null"].values():
        assert null["q025"] <= null["median"] <= null["q975"]
        assert null["median"] == pytest.approx(null["chance"], rel=0.5)
    assert len(results["questions"]["lora_vs_full"]["verdicts"]) == 4


def test_depth_numbers_and_verdicts_follow_from_the_numbers(quick_study):
    _, _, _, results = quick_study
    q = results["questions"]["depth"]
    numbers = q["numbers"]
    assert numbers["full"]["layers"] == list(range(6))
    for test, verdict in zip(numbers["tests"], q["verdicts"]):
        data = numbers[test["method"]]
        rows = [row for p in data["projections"] for row in data[p][test["measure"]]]
        again = trend_test(rows, seed=numbers["tests"].index(test))
        assert again.mean_rho == pytest.approx(test["mean_rho"], abs=1e-5)
        assert again.p_value == pytest.approx(test["p_value"], rel=1e-5)
        assert verdict["verdict"] == {"inconclusive": INCONCLUSIVE}.get(again.verdict, again.verdict)
        assert -1 <= test["mean_rho"] <= 1


def test_time_record_lists_every_cell(quick_study):
    _, _, _, results = quick_study
    t = results["time"]
    cells = {(c["task"], c["cell"]) for c in t["cells"]}
    assert ("rotten_tomatoes", "full-s0") in cells and ("trec", "r64-s1-query_value") in cells
    assert ("rotten_tomatoes", "r4-s0-query_key_value_attention.output.dense") in cells
    assert t["cells_trained_now"] == len(t["cells"]) and t["cells_reused"] == 0
    assert set(t["measurement_s"]) == {q.KEY for q in QUESTIONS}
    assert all(c["wall_time_s"] > 0 for c in t["cells"])


def test_cli_refuses_a_foreign_out_before_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine\n")
    proc = subprocess.run([sys.executable, "-m", "lora_analysis", "study", "--quick", "--out", str(out),
                           "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "not the output of a previous study" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "README.md").read_text() == "mine\n" and not (tmp_path / "runs").exists()
