"""The study's accuracy questions (4–7): each verdict rule on synthetic inputs whose answer is
known, each answer() + plot() through a fake view of the runs, and question 7 on real tiny
adapters (resized and evaluated as `evaluate` does, cached)."""

from __future__ import annotations

import io
import itertools
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scipy import stats
from training_fixtures import save_tiny_bert, write_sentiment_csv

from lora_analysis import evaluate, load_adapter, train
from lora_analysis.analysis.resize import RankRule, resize_adapter
from lora_analysis.errors import LoraAnalysisError
from lora_analysis.fileio import dumps_json
from lora_analysis.study import resize_curve, stability, targets, tasks
from lora_analysis.study.config import StudyConfig
from lora_analysis.study.seeds import holm, paired_difference, welch, within_one_se
from lora_analysis.training import cell_name
from lora_analysis.training.evaluation import run_config


# -- shared statistics ------------------------------------------------------------------------
def test_welch_matches_scipy_and_its_interval_inverts_the_test():
    a, b = [0.80, 0.81, 0.79, 0.805], [0.83, 0.85, 0.84]
    w = welch(a, b)
    reference = stats.ttest_ind(b, a, equal_var=False)
    assert w.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    interval = reference.confidence_interval(0.95)
    assert (w.low, w.high) == (pytest.approx(interval.low, rel=1e-12), pytest.approx(interval.high, rel=1e-12))
    assert w.difference == pytest.approx(np.mean(b) - np.mean(a), rel=1e-14)
    # the interval excludes 0 exactly when p < 0.05 (on both sides of the boundary)
    for shift in np.linspace(-0.06, 0.06, 25):
        t = welch(a, np.add(b, shift))
        assert (t.p_value < 0.05) == (t.low > 0 or t.high < 0)


def test_welch_with_constant_samples_knows_the_difference_exactly():
    assert welch([0.5, 0.5], [0.5, 0.5]).p_value == 1.0
    w = welch([0.5, 0.5], [0.6, 0.6])
    assert w.p_value == 0.0 and w.se == 0.0 and w.low == w.high == pytest.approx(0.1)
    with pytest.raises(LoraAnalysisError, match="at least two finite"):
        welch([0.5], [0.6, 0.7])


def test_holm_step_down_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.3, 0.2]) == pytest.approx([0.4, 0.4])  # 0.3·1 < 0.2·2: step-down keeps it monotone
    assert holm([0.6, 0.7, 0.9]) == pytest.approx([1.0, 1.0, 1.0])


def test_within_one_se_boundary_and_paired_difference():
    assert within_one_se(-0.01, 0.01) and within_one_se(0.02, 0.0)
    assert not within_one_se(-0.010001, 0.01) and not within_one_se(-1e-12, 0.0)
    d = [1 / 1281 - 0.0, 0.0]  # two seeds, one unchanged: |mean| = SE exactly, whatever the rounding
    assert within_one_se(-np.mean(d), np.std(d, ddof=1) / math.sqrt(2))
    mean, se = paired_difference([0.8, 0.7, 0.9], [0.79, 0.68, 0.90])
    assert mean == pytest.approx(-0.01) and se == pytest.approx(np.std([-0.01, -0.02, 0.0], ddof=1) / math.sqrt(3))


# -- question 4 ---------------------------------------------------------------------------------
def test_needed_rank_is_the_smallest_rank_within_one_welch_se():
    full = [0.80, 0.81, 0.79]
    lora = [[0.70, 0.71, 0.69], [0.795, 0.80, 0.79], [0.81, 0.80, 0.805], [0.60, 0.61, 0.62]]
    needed, rows = tasks.needed_rank([1, 2, 4, 8], lora, full)
    assert needed == 2
    r2 = rows[1]  # difference −0.005, SE √(1e−4/3 + 2.5e−5/3) ≈ 0.0065: within
    assert r2["difference"] == pytest.approx(-0.005) and r2["se"] == pytest.approx(math.sqrt(1e-4 / 3 + 2.5e-5 / 3))
    assert [row["within"] for row in rows] == [False, True, True, False]
    assert tasks.needed_rank([1, 2], [[0.5, 0.51], [0.6, 0.61]], full)[0] is None


def test_trend_test_three_tasks_can_never_decide_four_can():
    three = tasks.trend_test([0.05, 0.1, 0.2], [1, 2, 8])
    assert three["p_greater"] == pytest.approx(1 / 6) and three["smallest_p"] == pytest.approx(1 / 6)
    assert three["verdict"] == "inconclusive at this sample size" and three["tau"] == 1.0
    four = tasks.trend_test([0.05, 0.1, 0.2, 0.3], [1, 2, 8, 64])
    assert four["p_greater"] == pytest.approx(1 / 24) and four["verdict"] == "holds"
    against = tasks.trend_test([0.05, 0.1, 0.2, 0.3], [64, 8, 2, 1])
    assert against["p_less"] == pytest.approx(1 / 24) and against["verdict"] == "does not hold"
    flat = tasks.trend_test([0.05, 0.1, 0.2, 0.3], [2, 2, 2, 2])
    assert flat["s"] == 0 and flat["p_greater"] == 1.0 and flat["verdict"] == "inconclusive at this sample size"
    assert tasks.trend_test([0.1], [4])["p_greater"] == 1.0


def test_trend_test_p_value_by_enumeration_with_ties():
    x, y = [0.1, 0.3, 0.2, 0.4, 0.25], [1, 8, 8, 128, 2]
    result = tasks.trend_test(x, y)
    tau, _ = stats.kendalltau(x, y)
    s = result["s"]
    assert s == tasks.kendall_s(x, y)
    perms = [tasks.kendall_s(x, p) for p in itertools.permutations(y)]
    assert result["p_greater"] == pytest.approx(sum(v >= s for v in perms) / len(perms))
    assert np.sign(tau) == np.sign(s)  # scipy's τ_b and our S agree in sign


# -- question 5 ---------------------------------------------------------------------------------
def test_stability_planted_variances():
    rng = np.random.default_rng(0)
    calm, noisy = 0.8 + 0.001 * rng.standard_normal(30), 0.8 + 0.01 * rng.standard_normal(30)
    holds = stability.equal_variance_test(calm, noisy)
    assert holds["verdict"] == "holds" and holds["p_value"] < 1e-6
    assert holds["ratio_low"] < 100 < holds["ratio_high"]  # the true ratio σ²_full / σ²_LoRA = 100
    assert holds["p_value"] == pytest.approx(stats.levene(calm, noisy, center="median").pvalue, rel=1e-12)
    assert stability.equal_variance_test(noisy, calm)["verdict"] == "does not hold"
    same = stability.equal_variance_test([0.80, 0.81, 0.79, 0.80, 0.82], [0.81, 0.79, 0.80, 0.82, 0.80])
    assert same["verdict"] == "inconclusive at this sample size" and same["variance_ratio"] == pytest.approx(1.0)


def test_stability_f_interval_closed_form_and_degenerate_groups():
    lora, full = [0.80, 0.82, 0.79, 0.81, 0.80], [0.75, 0.85, 0.80, 0.78, 0.83]
    result = stability.equal_variance_test(lora, full)
    ratio = np.var(full, ddof=1) / np.var(lora, ddof=1)
    assert result["variance_ratio"] == pytest.approx(ratio)
    assert result["ratio_low"] == pytest.approx(ratio / stats.f.ppf(0.975, 4, 4))
    assert result["ratio_high"] == pytest.approx(ratio * stats.f.ppf(0.975, 4, 4))  # F(4,4): 1/F_{.025} = F_{.975}
    assert result["detectable_ratio"] == pytest.approx(9.6045, abs=1e-4)
    constant = stability.equal_variance_test([0.8] * 5, [0.8] * 5)
    assert constant["p_value"] is None and constant["variance_ratio"] is None
    assert constant["verdict"] == "inconclusive at this sample size"
    two = stability.equal_variance_test([0.79, 0.7901], [0.6, 0.9])  # two seeds: |x − median| equal within each group
    assert two["p_value"] is None and two["verdict"] == "inconclusive at this sample size"
    assert two["variance_ratio"] == pytest.approx(0.045 / 0.5e-8)
    dumps_json(constant), dumps_json(two)


# -- question 6 ---------------------------------------------------------------------------------
def test_targets_planted_differences_and_equal_means():
    labels = ["{q, v}", "{q, k, v, o}", "all linear"]
    rising = [[0.70, 0.701, 0.699], [0.75, 0.751, 0.749], [0.80, 0.801, 0.799]]
    rows = targets.pairwise_verdicts(labels, rising)
    assert [(r["than"], r["better"]) for r in rows] == [(labels[0], labels[1]), (labels[0], labels[2]), (labels[1], labels[2])]
    assert all(r["verdict"] == "holds" and r["p_holm"] >= r["p_value"] for r in rows)
    assert all(r["verdict"] == "does not hold" for r in targets.pairwise_verdicts(labels, rising[::-1]))
    equal = [[0.80, 0.81, 0.79], [0.805, 0.795, 0.80], [0.79, 0.80, 0.81]]
    assert all(r["verdict"] == "inconclusive at this sample size" for r in targets.pairwise_verdicts(labels, equal))


def test_targets_holm_can_turn_a_raw_rejection_into_inconclusive():
    a, b = [0.80, 0.81, 0.79, 0.80], [0.815, 0.825, 0.805, 0.815]
    raw = welch(a, b).p_value
    assert 0.025 < raw < 0.05  # significant alone, not after Holm over three pairs
    rows = targets.pairwise_verdicts(["a", "b", "c"], [a, b, [0.80, 0.81, 0.79, 0.80]])
    first = rows[0]
    assert first["p_value"] == pytest.approx(raw) and first["verdict"] == "inconclusive at this sample size"


# -- question 7 (rules) ---------------------------------------------------------------------------
def test_equivalence_margin_rules():
    trained = [0.80, 0.801, 0.799]
    assert resize_curve.equivalence([0.8005, 0.7995, 0.800], trained)["verdict"] == "holds"
    low = resize_curve.equivalence([0.75, 0.751, 0.749], trained)
    assert low["verdict"] == "does not hold" and low["high"] < -low["margin"]
    noisy = resize_curve.equivalence([0.78, 0.82, 0.80], trained)
    assert noisy["verdict"] == "inconclusive at this sample size" and noisy["low"] < -0.01
    tost = welch(trained, [0.8005, 0.7995, 0.800], 0.10)  # the 90 % interval is the TOST at 5 %
    assert resize_curve.equivalence([0.8005, 0.7995, 0.800], trained)["low"] == pytest.approx(tost.low)
    with pytest.raises(LoraAnalysisError, match="margin"):
        resize_curve.equivalence(trained, trained, margin=0.0)


def test_smallest_within_is_paired_by_seed():
    original = [0.80, 0.70, 0.90]  # seeds far apart: an unpaired SE would hide the drop at k = 1
    resized = [[0.78, 0.68, 0.88], [0.799, 0.701, 0.90], [0.80, 0.70, 0.90]]
    smallest, rows = resize_curve.smallest_within([1, 2, 4], original, resized)
    assert smallest == 2 and [r["within"] for r in rows] == [False, True, True]
    assert rows[0]["se"] == pytest.approx(0.0, abs=1e-12)
    assert resize_curve.smallest_within([1], original, [[0.5, 0.4, 0.6]])[0] is None


# -- answer() + plot() through fake views -------------------------------------------------------------
class FakeAdapter:
    def __init__(self, parameters: int) -> None:
        self.parameters = parameters

    def num_parameters(self) -> int:
        return self.parameters


class FakeRuns:
    """A StudyRunsView over synthetic accuracies (cell name → value) and fake adapters."""

    def __init__(self, config: StudyConfig, accuracies: dict[tuple[str, str], float], root: Path,
                 cells: dict[str, Path] | None = None, parameters: dict[str, int] | None = None) -> None:
        self.config, self.accuracies, self.root = config, accuracies, root
        self.cells, self.parameters = cells or {}, parameters or {}

    def accuracy(self, task: str, cell: str) -> float:
        if (task, cell) not in self.accuracies:
            raise LoraAnalysisError(f"{task}: cell {cell} was not trained")
        return self.accuracies[(task, cell)]

    def cell_dir(self, task: str, cell: str) -> Path:
        return self.cells[cell]

    def adapter(self, task: str, cell: str):
        if cell in self.cells:
            return load_adapter(self.cells[cell])
        return FakeAdapter(self.parameters[re.sub(r"-s\d+-", "-", cell)])

    def recipe(self, task: str):
        return run_config(next(iter(self.cells.values())))

    def cache_dir(self) -> Path:
        return self.root / "cache"


NOISE = (0.002, 0.01, 0.03)  # per task: the seed effect's amplitude


def seed_effect(task_index: int, seed: int) -> float:
    return NOISE[task_index] * math.sin(7 * seed + task_index)


def synthetic_accuracies(config: StudyConfig) -> dict[tuple[str, str], float]:
    """Every cell of the grid: task t's full fine-tuning 0.9 − 0.05t, LoRA at rank r 0.04/r
    below it; the seed effect of full fine-tuning is twice LoRA's."""
    values = {}
    for t, task in enumerate(config.tasks):
        for seed in sorted(set(config.seeds) | set(config.stability_seeds)):
            values[(task, f"full-s{seed}")] = 0.9 - 0.05 * t + seed_effect(t, seed)
            for r in config.ranks:
                values[(task, cell_name(r, seed, config.lora_targets))] = 0.9 - 0.05 * t - 0.04 / r + seed_effect(t, seed) / 2
    return values


def finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in finite_numbers(v)]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    assert isinstance(value, (int, float)) and math.isfinite(value), value
    return [value]


def check_answer(answer, key: str) -> bytes:
    assert answer.key == key and answer.verdicts and answer.measurement and answer.source
    for v in answer.verdicts:
        assert v.verdict in ("holds", "does not hold", "inconclusive at this sample size") and v.rule and v.effect
    dumps_json(answer.numbers)  # strict JSON: no NaN or Infinity anywhere
    finite_numbers(answer.numbers)
    figure = Figure()
    module = {"tasks": tasks, "stability": stability, "targets": targets, "resize_curve": resize_curve}[key]
    module.plot(answer, figure)
    width, _ = figure.get_size_inches()
    assert width <= 7.0
    for text in figure.findobj(lambda artist: hasattr(artist, "get_fontsize") and hasattr(artist, "get_text")):
        if text.get_text():
            assert text.get_fontsize() >= 7.0, text.get_text()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=60)
    return buffer.getvalue()


def accuracies_in_range(numbers) -> None:
    def walk(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif key in ("mean", "values", "accuracy") and isinstance(value, float):
            assert 0.0 <= value <= 1.0
    walk(numbers)


def test_tasks_answer_and_plot_on_a_fake_grid(tmp_path):
    config = StudyConfig(progress=False)
    runs = FakeRuns(config, synthetic_accuracies(config), tmp_path)
    answer = tasks.answer(runs)
    check_answer(answer, "tasks")
    accuracies_in_range(answer.numbers)
    per_task = answer.numbers["tasks"]
    assert list(per_task) == list(config.tasks)
    for t, task in enumerate(config.tasks):  # LoRA − full = −0.04/r − mean(effect)/2; within one SE once ≥ −SE
        effects = [seed_effect(t, seed) for seed in config.seeds]
        se = math.sqrt(1.25 * np.var(effects, ddof=1) / len(effects))
        expected = min((r for r in config.ranks if -0.04 / r - np.mean(effects) / 2 >= -se), default=None)
        assert per_task[task]["needed_rank"] == expected
        assert per_task[task]["difficulty"] == pytest.approx(0.1 + 0.05 * t + -np.mean(effects))
    assert [t["needed_rank"] for t in per_task.values()] == [None, None, 8]  # wider seed noise, wider SE: a lower rank
    assert answer.verdicts[0].verdict == "inconclusive at this sample size"
    assert answer.numbers["trend"]["smallest_p"] == pytest.approx(1 / 3)  # two tasks tied beyond the grid
    assert "so no verdict is possible" in answer.verdicts[0].rule
    with pytest.raises(LoraAnalysisError, match="not trained"):
        tasks.answer(FakeRuns(config, {}, tmp_path))


def test_stability_answer_and_plot_on_a_fake_grid(tmp_path):
    config = StudyConfig(progress=False)
    runs = FakeRuns(config, synthetic_accuracies(config), tmp_path)
    answer = stability.answer(runs)
    check_answer(answer, "stability")
    accuracies_in_range(answer.numbers)
    assert answer.numbers["lora"]["n"] == answer.numbers["full"]["n"] == 5
    # LoRA's seed effect is half of full fine-tuning's: variance ratio exactly 4
    assert answer.numbers["test"]["variance_ratio"] == pytest.approx(4.0)


def test_targets_answer_reads_parameter_counts_from_the_adapters(tmp_path):
    config = StudyConfig(progress=False)
    parameters = {cell_name(s.r, 0, s.targets).replace("-s0-", "-"): 73_728 + i for i, s in enumerate(config.target_settings)}
    accuracies = synthetic_accuracies(config)
    for i, s in enumerate(config.target_settings):
        accuracies |= {(config.main_task, cell_name(s.r, seed, s.targets)): 0.85 + 0.01 * i + seed_effect(0, seed)
                       for seed in config.seeds}
    answer = targets.answer(FakeRuns(config, accuracies, tmp_path, parameters=parameters))
    check_answer(answer, "targets")
    accuracies_in_range(answer.numbers)
    assert [s["parameters"] for s in answer.numbers["settings"]] == [73_728, 73_729, 73_730]
    assert len(answer.verdicts) == 3 and "73,728" in answer.measurement
    # settings 0.85, 0.86, 0.87 with the same seed effect: every difference exact, every pair holds
    assert [v.verdict for v in answer.verdicts] == ["holds"] * 3


# -- question 7 on real tiny adapters ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two seeds of a rank-4 LoRA on the tiny BERT, a few steps each."""
    root = tmp_path_factory.mktemp("study_resize")
    bert, csv = save_tiny_bert(root / "bert"), write_sentiment_csv(root / "sentiment.csv", n=120)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only wait on each other on a busy machine
    cells = {}
    try:
        for seed in (0, 1):
            cell = cell_name(4, seed, ["query", "value"])
            train(model=str(bert), data=str(csv), steps=3, batch_size=16, progress=False, eval_batch_size=32, r=4,
                  alpha=8.0, lr=5e-2, seed=seed, targets=["query", "value"], output_dir=root / cell)
            cells[cell] = root / cell
    finally:
        torch.set_num_threads(threads)
    return cells


def test_resize_curve_on_real_adapters_evaluates_as_evaluate_and_caches(tiny_runs, tmp_path, monkeypatch):
    config = StudyConfig(tasks=("sentiment",), seeds=(0, 1), ranks=(1, 2, 4), compare_ranks=(4,), depth_rank=4,
                         stability_rank=4, resize_from=4, resize_ranks=(1, 2, 4), device="cpu", progress=False)
    accuracies = {("sentiment", cell): evaluate(path, progress=False).accuracy for cell, path in tiny_runs.items()}
    for k in (1, 2):
        accuracies |= {("sentiment", cell_name(k, seed, ["query", "value"])): 0.5 + 0.01 * seed for seed in (0, 1)}
    runs = FakeRuns(config, accuracies, tmp_path, cells=tiny_runs)
    answer = resize_curve.answer(runs)
    check_answer(answer, "resize_curve")
    accuracies_in_range(answer.numbers)
    resized = {row["rank"]: row for row in answer.numbers["resized"]}
    recipe = run_config(tiny_runs["r4-s0-query_value"])
    oracle = resize_adapter(load_adapter(tiny_runs["r4-s0-query_value"]), RankRule("rank", 2), device="cpu", progress=False)
    assert resized[2]["values"][0] == evaluate(oracle.adapter, recipe, device="cpu", progress=False).accuracy
    assert resized[2]["energy_kept"][0] == pytest.approx(oracle.energy_kept, rel=1e-12)
    assert resized[4]["energy_kept"] == pytest.approx([1.0, 1.0], abs=1e-12)  # rank 4 of a rank-4 adapter: nothing cut
    assert [t["rank"] for t in answer.numbers["equivalence"]] == [1, 2] and len(answer.verdicts) == 2

    def no_work(*args, **kwargs):
        raise AssertionError("a re-run must read the cache")

    monkeypatch.setattr("lora_analysis.training.resize_eval.rank_sweep", no_work)
    assert resize_curve.answer(runs).numbers == answer.numbers
    # a recipe that differs only where evaluation does not look (training fields) reads the cache
    trained_otherwise = FakeRuns(config, accuracies, tmp_path, cells=tiny_runs)
    trained_otherwise.recipe = lambda task: replace(recipe, lr=1.0, steps=99, progress=True)  # type: ignore[method-assign]
    assert resize_curve.answer(trained_otherwise).numbers == answer.numbers
    # another recipe (another validation split) is another key: recomputed, not read
    other = FakeRuns(config, accuracies, tmp_path, cells=tiny_runs)
    other.recipe = lambda task: replace(recipe, split_seed=recipe.split_seed + 1)  # type: ignore[method-assign]
    with pytest.raises(AssertionError, match="must read the cache"):
        resize_curve.answer(other)
    # no rank trained below the source rank: the equivalence claim is untested, said so (from the cache)
    alone = replace(config, ranks=(4,))
    untested = resize_curve.answer(FakeRuns(alone, accuracies, tmp_path, cells=tiny_runs))
    assert [v.verdict for v in untested.verdicts] == ["inconclusive at this sample size"]
    assert untested.numbers["trained"] == [] and untested.numbers["resized"] == answer.numbers["resized"]
    check_answer(untested, "resize_curve")
