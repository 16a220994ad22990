"""Fuzzing the readers through the real CLI: mutated configs, patterns, tensors, dtypes and bytes.

Every mutant of every seed (`fuzz_oracle.SEEDS`) goes through `lora-analysis analyze` (in
process: `cli.main`, fast; a few in a subprocess) and must give

    exit 0 with numbers equal to a float64 oracle (`fuzz_oracle.predict`), or
    exit 2 with one line on stderr naming the file,

never exit 1, within a time limit per mutant, with the process below 2 GB of memory.

Profiles (hypothesis): "ci" (the default) runs a fixed, derandomized budget of examples per
test, a few tens of seconds in all; `HYPOTHESIS_PROFILE=long` runs thousands (the campaign in
benchmarks/README.md: `FUZZ_LOG=... HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py`).
`FUZZ_LOG=<file>` appends one JSON line per mutant (seed, mutation, exit code, seconds, peak RSS).
`FUZZ_KEEP_GOING=1` (campaigns only) logs a mutant's problems instead of failing on the first,
so one run classifies every problem; `benchmarks/fuzz_summary.py` then lists them and fails.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from fuzz_oracle import DTYPES, SEEDS, Safetensors, check_report, make_seed, predict
from lora_analysis.cli import main
from lora_analysis.errors import shown
from lora_analysis.report import load_schema

ROOT = Path(__file__).resolve().parents[1]
MAX_SECONDS = 120  # per mutant: only a hang exceeds it (a mutant takes well under a second)
MAX_RSS_BYTES = 2 << 30

pytestmark = pytest.mark.filterwarnings("ignore")


# ----------------------------------------------------------------------------- running a mutant


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so the CLI's `except Exception` cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`lora-analysis ARGV` in this process: (exit code, stdout, stderr)."""
    stdout, stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), time_limit(MAX_SECONDS):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = int(exit_.code or 0)
    stdout.flush()
    return code, stdout.buffer.getvalue().decode("utf-8"), stderr.getvalue()  # type: ignore[attr-defined]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def check_mutant(path: Path, description: str, formats: tuple[str, ...] = ("json",), seed: str = "") -> None:
    """The contract for one mutant of `seed` (module docstring); logs it when FUZZ_LOG is set."""
    prediction = predict(path)
    started = time.perf_counter()
    problems: list[str] = []
    codes = []
    # DoRA seeds have no base weights here: their direction updates are analysed (the readers' checks still run)
    options = ["--dora-direction"] if "dora" in seed else []
    for fmt in formats:
        code, out, err = run_cli(["analyze", str(path), "--format", fmt, "--quiet", *options])
        codes.append(code)
        problems += contract_problems(code, out, err, path, fmt, prediction)
    seconds = time.perf_counter() - started
    rss = peak_rss_bytes()
    if rss > MAX_RSS_BYTES:
        problems.append(f"peak RSS {rss / 2**30:.2f} GB")
    log = os.environ.get("FUZZ_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"mutant": shown(description, 400), "exit": codes, "seconds": round(seconds, 3),
                                "peak_rss_mb": rss >> 20, "oracle": prediction is not None, "problems": problems}) + "\n")
    if not os.environ.get("FUZZ_KEEP_GOING"):
        assert not problems, f"{shown(description, 2000)}: " + "; ".join(problems)


def contract_problems(code: int, out: str, err: str, path: Path, fmt: str, prediction) -> list[str]:
    if code == 2:
        lines = err.splitlines()
        errors = [line for line in lines if line.startswith("lora-analysis: error: ")]
        named = os.fspath(path) in err or os.fspath(path.parent if path.is_file() else path) in err
        if out or len(errors) != 1 or errors[0] != lines[-1] or not named:
            return [f"exit 2 without one line naming the file: {err[-500:]!r}"]
        return []
    if code != 0:
        return [f"exit {code}: {err[-800:]!r}"]
    if fmt != "json":
        return []
    try:
        report = json.loads(out, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(token)))
        jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)
    except (ValueError, jsonschema.ValidationError) as error:
        return [f"exit 0 with output that is not strict, schema-valid JSON: {str(error)[:300]}"]
    return check_report(report, prediction)


# ----------------------------------------------------------------------------- mutations


WEIRD_NAMES = ["layers.0.$\\frac$", "a\nb", "\x1b[31mred", "", ".", "x" * 3000, "é.ü.q", "layers.0.q\u202e",
               "base_model.model.", "lora_A", "m.lora_A.weight", "${x}", "a" * 20 + "b"]
REGEXES = ["q_proj", r"layers\.1\..*", "(a*)*b", "(", r"(x)\1", "(?=q)", "(?i)Q", "a{2000}", ".*", "",
           r"\d+\.self_attn\.v_proj", "[", "x)|(.*", "(a|aa)+$", "v_proj$", r"\bq"]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(-2, 9), max_size=2),
)
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1" + "0" * 400, "1e400", "-1e-400", "1E308", "[" * 50_000 + "]" * 50_000]


@st.composite
def config_mutation(draw) -> dict:
    field_ = draw(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out",
                                   "peft_type", "target_modules", "use_dora", "whole"]))
    if field_ in ("rank_pattern", "alpha_pattern"):
        keys = draw(st.lists(st.sampled_from(REGEXES), max_size=3, unique=True))
        value: Any = {k: draw(st.one_of(st.integers(-1, 9), st.floats(-1e300, 1e300), st.text(max_size=2))) for k in keys}
    elif field_ == "whole":
        value = draw(st.sampled_from(["truncate", "not-object", "bytes", "deep", "empty"]))
    else:
        value = draw(st.one_of(JSON_VALUES, st.sampled_from(RAW_TOKENS).map(lambda t: ("raw", t))))
    return {"kind": "config", "field": field_, "value": value}


@st.composite
def tensor_mutation(draw) -> dict:
    kind = draw(st.sampled_from(["dtype", "magnitude", "nonfinite", "shape", "drop", "duplicate", "rename", "alpha"]))
    return {"kind": kind, "index": draw(st.integers(0, 50)), "dtype": draw(st.sampled_from(sorted(DTYPES))),
            "exponent": draw(st.integers(-330, 330)), "value": draw(st.sampled_from([float("nan"), float("inf"), 1e300, -1.0, 0.0, 1e-300, 3.0])),
            "name": draw(st.sampled_from(WEIRD_NAMES)), "shape": draw(st.sampled_from(["add", "drop", "cut", "empty"]))}


@st.composite
def byte_mutation(draw) -> dict:
    kind = draw(st.sampled_from(["flip_header", "flip_body", "length", "truncate", "append", "insert"]))
    return {"kind": kind, "seed": draw(st.integers(0, 2**32 - 1)), "count": draw(st.integers(1, 8)),
            "length": draw(st.sampled_from([0, 1, 7, 8, 2**31, 2**63, 10**8 + 1, -1]))}


def weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    return next(p for p in (path / "adapter_model.safetensors", path / "adapter_model.bin", path / "adapter_model.pt")
                if p.exists())


def apply_config_mutation(path: Path, mutation: dict) -> None:
    config_file = (path if path.is_dir() else path.parent) / "adapter_config.json"
    weights = weights_file(path)
    header = Safetensors.parse(weights.read_bytes()) if weights.suffix == ".safetensors" else None
    in_header = not config_file.exists() and header is not None and "adapter_config" in (header.metadata or {})
    if not config_file.exists() and not in_header:
        config_file.write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    text = header.metadata["adapter_config"] if in_header else config_file.read_text()  # type: ignore[union-attr]
    text = mutated_config_text(text, mutation)
    if in_header:
        header.metadata["adapter_config"] = text  # type: ignore[union-attr]
        weights.write_bytes(header.to_bytes())  # type: ignore[union-attr]
    else:
        config_file.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)


def mutated_config_text(text: str, mutation: dict) -> str:
    field_, value = mutation["field"], mutation["value"]
    if field_ == "whole":
        return {"truncate": text[: len(text) // 2], "not-object": "[1, 2]", "bytes": "\udcff{",
                "deep": "[" * 100_000 + "]" * 100_000, "empty": ""}[value]
    config = json.loads(text)
    if isinstance(value, tuple):  # a raw token JSON cannot hold: pasted as text
        config[field_] = "@RAW@"
        return json.dumps(config).replace('"@RAW@"', value[1])
    config[field_] = value
    return json.dumps(config)


def apply_tensor_mutation(path: Path, mutation: dict) -> None:
    weights = weights_file(path)
    parsed = Safetensors.parse(weights.read_bytes())
    assert parsed is not None
    tensors = {k: torch.from_numpy(parsed.tensor(k)).to(DTYPES[parsed.header[k]["dtype"]]) for k in parsed.header}
    keys = sorted(tensors)
    key = keys[mutation["index"] % len(keys)]
    kind = mutation["kind"]
    if kind == "dtype":
        tensors[key] = tensors[key].to(torch.float64).to(DTYPES[mutation["dtype"]])
    elif kind == "magnitude":
        original = tensors[key]
        factor = torch.tensor(10.0, dtype=torch.float64) ** mutation["exponent"]  # 1e309 → inf, 1e-330 → 0
        tensors[key] = (original.to(torch.float64) * factor).to(original.dtype)
    elif kind == "nonfinite" and tensors[key].is_floating_point() and tensors[key].numel():
        flat = tensors[key].clone().reshape(-1)
        flat[mutation["index"] % flat.numel()] = torch.tensor(mutation["value"], dtype=torch.float64).to(flat.dtype)
        tensors[key] = flat.reshape(tensors[key].shape)
    elif kind == "shape":
        t = tensors[key]
        reshape = {"add": lambda: t.unsqueeze(0), "drop": lambda: t.reshape(-1), "cut": lambda: t[..., :-1],
                   "empty": lambda: t.reshape(-1)[:0]}[mutation["shape"]]
        tensors[key] = (reshape() if t.ndim else t.reshape(1)).contiguous()
    elif kind == "drop":
        del tensors[key]
    elif kind == "duplicate":
        other = key.removeprefix("base_model.model.") if key.startswith("base_model.model.") else "base_model.model." + key
        tensors[other] = tensors[key].clone()
    elif kind == "rename":
        module = key.rsplit(".lora_", 1)[0] if ".lora_" in key else key.rsplit(".", 1)[0]
        for k in [k for k in keys if k.startswith(module + ".")]:
            tensors[k.replace(module, "base_model.model." + mutation["name"] if module.startswith("base_model.model.")
                              else mutation["name"], 1)] = tensors.pop(k)
    elif kind == "alpha":
        alphas = [k for k in keys if k.endswith(".alpha")]
        if alphas:
            tensors[alphas[mutation["index"] % len(alphas)]] = torch.tensor(mutation["value"], dtype=torch.float64).to(
                DTYPES[mutation["dtype"]] if DTYPES[mutation["dtype"]].is_floating_point else torch.float64)
    if not tensors:
        tensors = {"nothing": torch.zeros(1)}
    weights.write_bytes(safetensors_bytes({k: t.contiguous() for k, t in tensors.items()},
                                          metadata={k: str(v) for k, v in (parsed.metadata or {}).items()} or None))


def apply_byte_mutation(path: Path, mutation: dict) -> None:
    weights = weights_file(path)
    data = bytearray(weights.read_bytes())
    rng = random.Random(mutation["seed"])
    header_end = min(len(data), 8 + int.from_bytes(data[:8], "little")) if weights.suffix == ".safetensors" else min(len(data), 200)
    kind = mutation["kind"]
    if kind in ("flip_header", "flip_body"):
        low, high = (0, header_end) if kind == "flip_header" else (header_end, len(data))
        if high > low:
            for _ in range(mutation["count"]):
                data[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
    elif kind == "length" and len(data) >= 8:
        data[:8] = (mutation["length"] % 2**64).to_bytes(8, "little")
    elif kind == "truncate":
        del data[rng.randrange(len(data) + 1):]
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(mutation["count"] * 7))
    elif kind == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(mutation["count"]))
    weights.write_bytes(bytes(data))


MUTANT_NUMBERS = itertools.count(1)


def fresh_seed(root: Path, seed: str) -> Path:
    """A new copy of `seed` in its own folder under `root` (a mutant is written over it)."""
    number = next(MUTANT_NUMBERS)
    return make_seed(seed, root / f"m{number}", seed=number)


# ----------------------------------------------------------------------------- the tests

FIXTURE_SEEDS = [s for s in SEEDS if s.startswith("fixture:")]
SAFETENSORS_SEEDS = [s for s in SEEDS if s not in ("loralib_pt", "fixture:torchtune_lora")]
CONFIG_SEEDS = ["peft_dir", "peft_file", "fixture:peft_lora_linear", "fixture:peft_rslora_patterns"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("seed", SEEDS)
def test_seeds_match_the_oracle(seed, workdir):
    """The unmutated seeds: exit 0 and the oracle's numbers (or, for a layout the readers do not
    read yet, exit 2 naming the file); text and HTML render too."""
    path = make_seed(seed, workdir / f"seed-{seed.replace(':', '_')}")
    check_mutant(path, f"seed {seed}", formats=("json", "text"), seed=seed)


@given(seed=st.sampled_from(CONFIG_SEEDS), mutation=config_mutation())
def test_config_mutants(seed, mutation, workdir):
    path = fresh_seed(workdir / "config", seed)
    apply_config_mutation(path, mutation)
    check_mutant(path, f"{seed} config {mutation}", seed=seed)


@given(seed=st.sampled_from(SAFETENSORS_SEEDS), mutation=tensor_mutation())
def test_tensor_mutants(seed, mutation, workdir):
    path = fresh_seed(workdir / "tensors", seed)
    apply_tensor_mutation(path, mutation)
    check_mutant(path, f"{seed} tensors {mutation}", formats=("json", "text") if mutation["kind"] == "rename" else ("json",),
                 seed=seed)


@given(seed=st.sampled_from(SEEDS), mutation=byte_mutation())
def test_byte_mutants(seed, mutation, workdir):
    path = fresh_seed(workdir / "bytes", seed)
    apply_byte_mutation(path, mutation)
    check_mutant(path, f"{seed} bytes {mutation}", seed=seed)


def figure_hazard(name: str) -> bool:
    """A name that could break a figure: mathtext ($), control characters, a huge label."""
    return "$" in name or not name.isprintable() or len(name) > 1000


@pytest.mark.parametrize("name", [n for n in WEIRD_NAMES if "\n" not in n])
def test_weird_names_render_in_every_format(workdir, name):
    """Module names are data: mathtext, terminal escapes, bidi overrides, 3000 characters go
    through JSON, text, markdown and (names that could break a figure: HTML rendering is the
    slow part) HTML with its figures at exit 0, and no warning carries them raw."""
    path = make_seed("peft_dir", workdir / f"names-{WEIRD_NAMES.index(name)}")
    apply_tensor_mutation(path, {"kind": "rename", "index": 0, "name": name, "dtype": "F32", "exponent": 0,
                                 "value": 0.0, "shape": "add"})
    for fmt in ("json", "text", "markdown", "html") if figure_hazard(name) else ("json", "text", "markdown"):
        code, out, err = run_cli(["analyze", str(path), "--format", fmt, "--quiet"])
        assert code == 0 and "\x1b" not in err and "\u202e" not in err, err
        assert not contract_problems(code, out, err, path, fmt, predict(path))
        if fmt != "json":
            assert "\x1b" not in out and "\u202e" not in out


SUBPROCESS_MUTANTS = [
    ("peft_dir", {"kind": "config", "field": "rank_pattern", "value": {"(a*)*b": 2}}),
    ("kohya", {"kind": "length", "seed": 0, "count": 1, "length": 2**63}),
    ("peft_file", {"kind": "flip_header", "seed": 3, "count": 4, "length": 0}),
]


@pytest.mark.parametrize("seed, mutation", SUBPROCESS_MUTANTS, ids=["redos-config", "header-length", "header-bits"])
def test_mutants_in_a_fresh_process(seed, mutation, workdir):
    """As a user runs it: a fresh interpreter, a wall-clock limit, its peak RSS below 2 GB."""
    path = make_seed(seed, workdir / f"sub-{mutation['kind']}")
    if mutation["kind"] == "config":
        apply_config_mutation(path, mutation)
    else:
        apply_byte_mutation(path, mutation)
    result = subprocess.run([sys.executable, "-m", "lora_analysis", "analyze", str(path), "--format", "json", "--quiet"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert not contract_problems(result.returncode, result.stdout, result.stderr, path, "json", predict(path))
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < MAX_RSS_BYTES


def test_the_oracle_catches_a_wrong_number(workdir):
    """The contract is not vacuous: a report whose σ₁ is off by 1e-3 fails it."""
    path = make_seed("peft_dir", workdir / "vacuous")
    code, out, _ = run_cli(["analyze", str(path), "--format", "json", "--quiet"])
    report = json.loads(out)
    assert code == 0 and not check_report(report, predict(path))
    name = next(iter(report["modules"]))
    report["modules"][name]["singular_values"][0] *= 1.001
    assert check_report(report, predict(path))
    assert np.isfinite(report["modules"][name]["singular_values"][0])
