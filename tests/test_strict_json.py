"""JSON output is strict RFC 8259 whatever the numbers: a value that is not a finite float64
becomes null with its reason under `null_reasons` (JSON Pointer → why); a NaN can never slip out."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_analysis.cli import main
from lora_analysis.fileio import dumps_json
from lora_analysis.report import json_ready, load_schema


def strict_loads(text: str):
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def resolve(document, pointer: str):
    for token in pointer.lstrip("/").split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document


@pytest.mark.parametrize("magnitude", [1e100, 1e120])
def test_huge_f64_factors_give_strict_schema_valid_json(tmp_path, capsys, magnitude):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64) * magnitude
    B = torch.randn(6, 3, generator=g, dtype=torch.float64) * magnitude
    path = tmp_path / "huge.safetensors"
    save_file({"m.lora_down.weight": A, "m.lora_up.weight": B, "m.alpha": torch.tensor(3.0, dtype=torch.float64)}, path)
    code = main(["analyze", str(path), "--format", "json", "--quiet"])
    out, err = capsys.readouterr()
    if code == 2:  # refusing is allowed: one line naming the file
        assert err.count("\n") == 1 and str(path) in err
        return
    assert code == 0, err
    report = strict_loads(out)
    jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)
    oracle = np.linalg.svd(B.numpy() @ A.numpy(), compute_uv=False)[:3]  # s = α/r = 1; entries ~1e200·r fit float64
    module = report["modules"]["m"]
    assert module["singular_values"] == pytest.approx(list(oracle), rel=1e-10)
    for pointer, reason in report.get("null_reasons", {}).items():
        assert resolve(report, pointer) is None and reason
    # every number that is null has a reason, every other number is finite
    nulls = {p for p in report.get("null_reasons", {})}
    for key in ("frobenius_norm", "sigma_max", "stable_rank", "energy_effective_rank"):
        value = module[key]
        assert (value is None) == (f"/modules/m/{key}" in nulls)
        assert value is None or math.isfinite(value)


def test_json_ready_replaces_every_non_finite_number_and_names_it():
    report = {"modules": {"a/b~c": {"x": float("nan"), "s": [1.0, float("inf")], "ok": 2.0}},
              "rows": [[float("-inf"), None]]}
    ready = json_ready(report)
    assert ready["modules"]["a/b~c"] == {"x": None, "s": [1.0, None], "ok": 2.0}
    assert set(ready["null_reasons"]) == {"/modules/a~1b~0c/x", "/modules/a~1b~0c/s/1", "/rows/0/0"}
    assert ready["null_reasons"]["/rows/0/0"].startswith("-Infinity")
    assert math.isnan(report["modules"]["a/b~c"]["x"])  # the input is not modified
    strict_loads(dumps_json(ready))


def test_dumps_json_refuses_nan():
    with pytest.raises(ValueError):
        dumps_json({"x": float("nan")})
