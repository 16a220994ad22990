"""Self-consistency of the adapter-format fixtures in tests/fixtures/formats (no lora_analysis code).

Each fixture folder holds an adapter written by a tool's own code, the base weights it applies
to, the ΔW that tool itself computes (reference.safetensors) and expected.json (the contract the
readers are tested against; see tests/fixtures/formats/README.md). These tests check that the
fixtures are complete and that, for every module with a known closed form, the reference equals
that closed form evaluated on the file's own tensors in float64 — which is the math a reader
must implement, written out once:

- lora:      ΔW = s · reshape(B₂ A₂)          A₂ = A.flatten(1) (r, d_in·k…), B₂ = B.flatten(1) (d_out, r);
             transposed first when `transpose` / `fan_in_fan_out` (embeddings, GPT-2 Conv1D);
             loralib's Conv2d factors (r·k, c_in·k) / (c_out·k, r·k) reshape the same way.
             Δbias = s · B_bias (PEFT lora_bias).
- lora_experts: ΔW[e] = s · B_e A_e, A_e = A.reshape(E, r, d_in)[e], B_e = B.reshape(d_out, r, E)[:, :, e].
- lora_merged:  fused q|k|v with per-part enable (loralib MergedLinear, LitGPT qkv): `merged_linear_delta`.
- adalora:   ΔW = s · B (A ∘ E)  (E: (r, 1); s = α / (ranknum + 1e-5)).
- tucker:    ΔW[o, c, h, w] = s · Σ_ab up[o, a] mid[a, b, h, w] down[b, c].
- loha:      ΔW = s · (w1_a w1_b) ∘ (w2_a w2_b), reshaped to W.
- lokr:      ΔW = s · kron(w1, w2₂) reshaped to W; w = w or w_a w_b; w2₂ = w2.flatten(1).
- dora:      V = W0 + s·ΔW_lora; ΔW = (m / ‖V‖_out) · V − W0, norm over all axes but the output axis.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
FOLDERS = sorted(p.parent for p in FIXTURES.glob("*/expected.json"))
KINDS = {"lora", "adalora", "tucker", "loha", "lokr", "dora", "dense"}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@lru_cache(maxsize=None)
def expected_of(folder: Path) -> dict:
    return json.loads((folder / "expected.json").read_text())


@lru_cache(maxsize=None)
def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of the fixture's tensor file (safetensors, or a weights_only torch pickle)."""
    expected = expected_of(folder)
    path = folder / expected.get("tensor_file", expected["adapter_files"][0])
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    for part in expected.get("tensor_root") or []:
        tensors = tensors[part]
    return tensors


@lru_cache(maxsize=None)
def reference_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(folder / expected_of(folder)["reference_file"])


@lru_cache(maxsize=None)
def base_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(folder / expected_of(folder)["base_file"])


def module_cases() -> list:
    cases = []
    for folder in FOLDERS:
        for module in expected_of(folder)["modules"]:
            if module["closed_form"]:
                cases.append(pytest.param(folder, module, id=f"{folder.name}:{module['reference_key']}"))
    return cases


def test_fixture_folders_found():
    assert len(FOLDERS) >= 20, FOLDERS


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_listed_files_exist_and_schema(folder: Path):
    expected = expected_of(folder)
    for name in expected["adapter_files"] + [expected["base_file"], expected["reference_file"]]:
        assert (folder / name).is_file(), name
    assert expected["tool"] in expected["versions"] and expected["versions"][expected["tool"]] == expected["tool_version"]
    assert expected["modules"], "no modules"
    for module in expected["modules"]:
        assert module["kind"] in KINDS, module["kind"]
        assert module["name"] and not module["name"].startswith(("base_model.model.", "unet.", "text_encoder."))
        assert (module["alpha"] is None) == (module["alpha_source"] is None), module["reference_key"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_references_match_expected(folder: Path):
    expected, reference, base = expected_of(folder), reference_of(folder), base_of(folder)
    keys = {m["reference_key"] for m in expected["modules"]}
    bias_keys = {m["bias_reference_key"] for m in expected["modules"] if m.get("bias_reference_key")}
    assert set(reference) == keys | bias_keys
    assert len(keys) == len(expected["modules"]), "a module listed twice"
    for module in expected["modules"]:
        delta = reference[module["reference_key"]]
        assert list(delta.shape) == module["delta_shape"]
        assert base[module["reference_key"]].shape == delta.shape
        assert delta.dtype in (torch.float32, torch.float64)
        assert torch.isfinite(delta).all()
        if module.get("zero_rank"):
            assert delta.abs().max() == 0
        else:
            assert delta.abs().max() > 0


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_file_keys_exist(folder: Path):
    tensors = adapter_tensors(folder)
    for module in expected_of(folder)["modules"]:
        for role, key in module["file_keys"].items():
            assert key in tensors, f"{role}: {key}"


def value_at(folder: Path, location: list[str]):
    """Follow an alpha_source path: [json file, key, ...], [safetensors file, tensor key] (0-dim tensor) or
    [safetensors file, "__metadata__", header key, key, ...] (a header string holding JSON)."""
    file_name, *path = location
    if file_name.endswith(".json"):
        value = json.loads((folder / file_name).read_text())
    elif path[0] == "__metadata__":
        with safe_open(folder / file_name, "pt") as handle:
            header = handle.metadata()
        value, path = json.loads(header[path[1]]), path[2:]
    else:
        return float(adapter_tensors(folder)[path[0]])
    for key in path:
        value = value[key]
    return value


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_alpha_is_where_alpha_source_says(folder: Path):
    for module in expected_of(folder)["modules"]:
        if module["alpha_source"] is not None:
            assert value_at(folder, module["alpha_source"]) == module["alpha"], module["reference_key"]


def lora_delta(t: dict[str, torch.Tensor], shape: list[int], scale: float, transpose: bool) -> torch.Tensor:
    product = scale * (t["B"].flatten(1) @ t["A"].flatten(1))
    return (product.T if transpose else product).reshape(shape)


def merged_linear_delta(t: dict[str, torch.Tensor], module: dict) -> torch.Tensor:
    """Fused-projection LoRA (loralib MergedLinear, LitGPT's qkv): W's output rows are split into parts of
    `part_rows` rows (q | k | v); the n enabled parts share A (r·n, d_in) and B (Σ enabled part rows, r):
    enabled part i uses A[i·r:(i+1)·r] and the i-th block of B's rows, and its product fills that part's
    rows of ΔW; disabled parts stay zero. Then s·, transposed for fan_in_fan_out."""
    rows, enable = module["part_rows"], module["enable_lora"]
    r = t["A"].shape[0] // sum(enable)
    full = torch.zeros(sum(rows), t["A"].shape[1], dtype=torch.float64)
    a_start = b_start = row_start = 0
    for part_rows, enabled in zip(rows, enable):
        if enabled:
            block_b = t["B"][b_start : b_start + part_rows]
            full[row_start : row_start + part_rows] = block_b @ t["A"][a_start : a_start + r]
            a_start, b_start = a_start + r, b_start + part_rows
        row_start += part_rows
    full = module["scale"] * full
    return (full.T if module["fan_in_fan_out"] else full).reshape(module["delta_shape"])


def closed_form(module: dict, t: dict[str, torch.Tensor], w0: torch.Tensor) -> torch.Tensor:
    form, shape, s = module["closed_form"], module["delta_shape"], module["scale"]
    transpose = module.get("transpose", False) or module["fan_in_fan_out"]
    if form == "lora":
        return lora_delta(t, shape, s, transpose)
    if form == "lora_merged":
        return merged_linear_delta(t, module)
    if form == "lora_experts":
        experts, d_in = module["num_experts"], t["A"].shape[1]
        a = t["A"].reshape(experts, -1, d_in)
        b = t["B"].reshape(t["B"].shape[0], -1, experts)
        per_expert = torch.stack([s * b[:, :, e] @ a[e] for e in range(experts)])
        return per_expert if module["experts_out_in"] else per_expert.transpose(1, 2)
    if form == "adalora":
        if module.get("zero_rank"):
            return torch.zeros(shape, dtype=torch.float64)
        return (s * t["B"] @ (t["A"] * t["E"])).reshape(shape)
    if form == "tucker":
        up, down = t["B"].flatten(1), t["A"].flatten(1)
        return s * torch.einsum("oa,abhw,bc->ochw", up, t["mid"], down)
    if form == "loha":
        return (s * (t["w1_a"] @ t["w1_b"].flatten(1)) * (t["w2_a"] @ t["w2_b"].flatten(1))).reshape(shape)
    if form == "lokr":
        w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
        w2 = t["w2"].flatten(1) if "w2" in t else t["w2_a"] @ t["w2_b"].flatten(1)
        return (s * torch.kron(w1, w2)).reshape(shape)
    if form == "dora":
        direction = w0 + lora_delta(t, shape, s, transpose)
        norm = direction.flatten(1).norm(dim=1).reshape(-1, *[1] * (direction.dim() - 1))
        magnitude = t["magnitude"].reshape(-1, *[1] * (direction.dim() - 1))
        return magnitude / norm * direction - w0
    raise AssertionError(f"unknown closed form {form}")


@pytest.mark.parametrize("folder, module", module_cases())
def test_reference_equals_closed_form(folder: Path, module: dict):
    tensors = adapter_tensors(folder)
    t = {role: tensors[key].to(torch.float64) for role, key in module["file_keys"].items()}
    w0 = base_of(folder)[module["reference_key"]].to(torch.float64)
    reference = reference_of(folder)[module["reference_key"]].to(torch.float64)
    got = closed_form(module, t, w0)
    tolerance = 1e-9 * float(reference.abs().max()) + 1e-300
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=tolerance)
    if module.get("bias_reference_key"):
        torch.testing.assert_close(
            module["scale"] * t["B_bias"], reference_of(folder)[module["bias_reference_key"]].to(torch.float64)
        )
