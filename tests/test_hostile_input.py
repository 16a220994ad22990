"""Hostile and broken input through the real CLI (issue 11): exit 2 with one line naming the file
where the input is at fault, never exit 1; names are data (escaped in reports and errors, never
mathtext); messages say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_analysis.cli import main


def peft_dir(folder: Path, names: list[str], config: str | None = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4}',
             d_in: int = 4, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, d_in, generator=g)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(3, 2, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    if config is not None:
        (folder / "adapter_config.json").write_text(config)
    return folder


def run(argv: list[str], capfd) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"])
    out, err = capfd.readouterr()
    return code, out, err


def refused(argv: list[str], capfd, *needles: str) -> str:
    code, out, err = run(argv, capfd)
    assert code == 2 and out == "" and err.count("\n") == 1, (code, err)
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("config, problem", [
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 1' + "0" * 400 + "}", "out of float64 range"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}', "not valid JSON"),
])
def test_configs_are_read_strictly(tmp_path, capfd, config, problem):
    folder = peft_dir(tmp_path / "a", ["m.q"], config)
    refused(["analyze", str(folder)], capfd, str(folder / "adapter_config.json"), problem)


def test_shard_index_with_a_list_weight_map(tmp_path, capfd):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"m.q.weight": torch.randn(3, 4)}, base / "model-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-00001.safetensors"]}))
    refused(["analyze", str(peft_dir(tmp_path / "a", ["m.q"])), "--base", str(base)], capfd,
            str(base / "model.safetensors.index.json"), "weight_map")


MATHTEXT = ["layers.0.$\\frac$", "layers.1.a$b", "$\\sqrt{x}$.layers.2.$q$", "layers.3.\\alpha_{1}"]


def test_mathtext_in_names_is_drawn_as_text(tmp_path, capfd):
    folder = peft_dir(tmp_path / "a", MATHTEXT)
    page = tmp_path / "r.html"
    assert run(["analyze", str(folder), "--format", "html", "-o", str(page)], capfd)[0] == 0
    assert "layers.0.$\\frac$" in page.read_text()
    plot = tmp_path / "phi.svg"
    assert run(["compare", str(folder), str(folder), "--plot", str(plot)], capfd)[0] == 0
    assert plot.read_bytes().startswith(b"<?xml")


def test_names_cannot_forge_report_lines_or_terminal_escapes(tmp_path, capfd):
    forged = "m.q\n\x1b[31mFAKE LINE\r"
    folder = peft_dir(tmp_path / "a", [forged, "m.k"])
    code, out, _ = run(["analyze", str(folder)], capfd)
    assert code == 0 and "\x1b" not in out and "\r" not in out
    assert "m.q\\n\\x1b[31mFAKE LINE\\r" in out and not any(line.startswith("\x1b") or line.startswith("FAKE") for line in out.splitlines())
    code, out, _ = run(["analyze", str(folder), "--format", "markdown"], capfd)
    assert code == 0 and "\x1b" not in out


def test_a_10kB_name_gives_a_short_error_line(tmp_path, capfd):
    folder = tmp_path / "a"
    folder.mkdir()
    save_file({"base_model.model." + "x" * 10_000 + ".lora_A.weight": torch.ones(2, 4)}, folder / "adapter_model.safetensors")
    err = refused(["analyze", str(folder)], capfd, "more characters")
    assert len(err) < 600


def test_huge_finite_kohya_alpha_is_a_number(tmp_path, capfd):
    """α = 1e300 on factors ~1e-160: ΔW ~ 1e-20·1e300/r... representable, so it is analysed."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 5, generator=g, dtype=torch.float64) * 1e-160
    B = torch.randn(4, 2, generator=g, dtype=torch.float64) * 1e-160
    path = tmp_path / "k.safetensors"
    save_file({"m.lora_down.weight": A, "m.lora_up.weight": B, "m.alpha": torch.tensor(1e300, dtype=torch.float64)}, path)
    code, out, err = run(["analyze", str(path), "--format", "json"], capfd)
    assert code == 0, err
    oracle = np.linalg.svd((B.numpy() * 1e150) @ (A.numpy() * 1e150), compute_uv=False)[:2] * (1e300 / 2) * 1e-300
    assert json.loads(out)["modules"]["m"]["singular_values"] == pytest.approx(list(oracle), rel=1e-9)


def test_spectrum_failure_names_the_file_and_the_cause(tmp_path, capfd):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "huge.safetensors"
    save_file({"m.lora_down.weight": torch.randn(2, 5, generator=g, dtype=torch.float64) * 1e200,
               "m.lora_up.weight": torch.randn(4, 2, generator=g, dtype=torch.float64) * 1e200}, path)
    refused(["analyze", str(path)], capfd, str(path), "module m", "σ₁ of ΔW is about 1e4", "overflows float64")


@pytest.mark.parametrize("side", ["a", "b"])
def test_compare_refuses_a_module_named_twice_on_either_side(tmp_path, capfd, side):
    """`bert.m.q` and `m.q` name one module (known prefixes are ignored when matching): which of
    the two to compare would be a guess, on side A as on side B."""
    twice = peft_dir(tmp_path / "twice", ["bert.m.q", "m.q"])
    once = peft_dir(tmp_path / "once", ["m.q"])
    inputs = [twice, once] if side == "a" else [once, twice]
    refused(["compare", *map(str, inputs)], capfd, f"{twice}: modules bert.m.q and m.q name the same module")


def test_compare_dimension_mismatch_names_both_files(tmp_path, capfd):
    a = peft_dir(tmp_path / "a", ["m.q"], d_in=4)
    b = peft_dir(tmp_path / "b", ["m.q"], d_in=5)
    refused(["compare", str(a), str(b)], capfd, f"{a} and {b}", "m.q", "different dimensions")


def test_non_finite_alpha_option_is_a_usage_error(tmp_path, capfd):
    folder = peft_dir(tmp_path / "a", ["m.q"], config=None)
    for value in ("nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            main(["analyze", str(folder), "--alpha", value])
        assert exit_.value.code == 2
    capfd.readouterr()


FIXTURES = Path(__file__).parent / "fixtures" / "formats"


@pytest.mark.parametrize("fixture, weights", [("peft_loha", "adapter_model.safetensors"),
                                              ("peft_lokr", "adapter_model.safetensors"),
                                              ("lycoris_loha", "lycoris.safetensors"),
                                              ("lycoris_lokr", "lycoris.safetensors"),
                                              ("lycoris_locon", "lycoris.safetensors")])
def test_empty_or_scalar_factors_are_refused(tmp_path, capfd, fixture, weights):
    """Found by the fuzz campaign: an empty hada_w1_b made `reshape(0, -1)` raise, a 0-dim
    kohya lora_down `shape[0]` (exit 1). Every factor of one module, emptied or made 0-dim, is
    refused in one line naming the file."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(FIXTURES / fixture, tmp_path / "seed")
    tensors = load_file(tmp_path / "seed" / weights)
    first = sorted(k for k in tensors if any(m in k for m in (".hada_", ".lokr_", ".lora_down", ".lora_up")))[0]
    module = first[: min(first.index(m) for m in (".hada_", ".lokr_", ".lora_down", ".lora_up") if m in first)]
    for key in sorted(k for k in tensors if k.startswith(module + ".") and not k.endswith(".alpha")):
        for broken in (torch.zeros(0), torch.tensor(1.0)):
            save_file({**tensors, key: broken}, tmp_path / "seed" / weights)
            target = tmp_path / "seed" if weights.startswith("adapter_model") else tmp_path / "seed" / weights
            refused(["analyze", str(target)], capfd, str(tmp_path / "seed"))


def test_a_name_a_pattern_cannot_match_exactly_is_refused_naming_the_file(tmp_path, capfd):
    """Python's `$` (PEFT's rule) also matches before a final line break, RE2's does not: such
    a name against a config pattern is refused (exit 2, the file named), never matched wrongly."""
    folder = peft_dir(tmp_path / "a", ["layers.0.q\n"],
                      config='{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"q": 8}}')
    refused(["analyze", str(folder)], capfd, str(folder), "config pattern", "line break")
