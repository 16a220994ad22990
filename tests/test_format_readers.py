"""Our readers against the fixtures written by each tool's own code (tests/fixtures/formats).

For every module listed in a fixture's expected.json: its name and component, kind, r, α and
scale as the tool defines them, and singular values equal to those of the ΔW the tool itself
computes (reference.safetensors, float64), to rtol 1e-5 of σ₁. A fixture whose file does not
record something says so (α null, component only where keys carry it), and so must we.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_analysis import load_adapter
from lora_analysis.analysis import module_spectrum
from lora_analysis.errors import AdapterFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
FOLDERS = sorted(p.parent for p in FIXTURES.glob("*/expected.json"))
# Key prefixes through which a file records a module's pipeline component.
COMPONENT_MARKERS = ("unet.", "text_encoder.", "transformer.", "lora_unet_", "lora_te", "lycoris_")


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def expected_of(folder: Path) -> dict:
    return json.loads((folder / "expected.json").read_text())


def adapter_path(folder: Path, expected: dict) -> Path:
    """The folder for directory formats (config beside the weights), else the single file."""
    files = expected["adapter_files"]
    return folder / files[0] if len(files) == 1 else folder


def readable_copy(folder: Path, expected: dict, tmp_path: Path) -> Path:
    """LitGPT writes model_config.yaml beside every checkpoint (the fixture keeps its content
    in expected.json): a copy of the fixture with it, as a user has it."""
    if "litgpt_config" not in expected:
        return folder
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "model_config.yaml").write_text(yaml.safe_dump(expected["litgpt_config"]))
    return copy


def load(folder: Path, tmp_path: Path):
    expected = expected_of(folder)
    base = tensors_of(folder / expected["base_file"])
    where = readable_copy(folder, expected, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # α unknown in some formats: asserted below instead
        adapter = load_adapter(adapter_path(where, expected), weight_shapes={k: tuple(v.shape) for k, v in base.items()})
    return expected, adapter, base


def reference_singular_values(delta: torch.Tensor, experts: bool) -> torch.Tensor:
    """σ of the tool's ΔW: flattened per output channel; a fused expert parameter (E, out, in)
    as the block-diagonal operator, whose σ are the union of the experts'."""
    if experts:
        return torch.cat([torch.linalg.svdvals(block) for block in delta]).sort(descending=True).values
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))


def module_cases() -> list:
    return [pytest.param(folder, id=folder.name) for folder in FOLDERS]


@pytest.mark.parametrize("folder", module_cases())
def test_fixture_modules_names_alpha_scale_and_singular_values(folder: Path, tmp_path: Path):
    expected, adapter, base = load(folder, tmp_path)
    reference = tensors_of(folder / expected["reference_file"])
    assert len(adapter) == len(expected["modules"])
    by_name = {}
    for key in adapter.modules:
        info = adapter.info(key)
        path = key.rpartition("/")[2]
        assert (info.component, path) not in by_name, key
        by_name[(info.component, path)] = key
    litgpt_config = expected.get("litgpt_config")
    for module in expected["modules"]:
        recorded = any(module["file_keys"][role].startswith(COMPONENT_MARKERS) for role in module["file_keys"])
        component = module["component"] if recorded else None
        key = by_name.pop((component, module["name"]))
        info = adapter.info(key)
        assert info.kind == module["kind"], key
        assert info.r == module["r"], key
        alpha = module["alpha"]
        if alpha is None and litgpt_config is not None:
            alpha = float(litgpt_config["lora_alpha"])  # from the model_config.yaml beside it
        assert info.alpha == alpha, key
        if alpha is None:
            assert info.scale is None and not info.alpha_known, key
        elif not module.get("zero_rank"):
            assert info.scale == pytest.approx(module["scale"], rel=1e-12), key
        update = adapter[key]
        W0 = None
        if update.needs_base:
            W0 = base[module["reference_key"]].double()
            W0 = W0.reshape(W0.shape[0], -1).T if info.storage.transposed else W0.reshape(W0.shape[0], -1)
        S = module_spectrum(update, device="cpu", dtype=torch.float64, base=W0).S
        if info.scale is None:
            S = S * module["scale"]  # the tool's scale, which the file does not record
        S_ref = reference_singular_values(reference[module["reference_key"]].double(), bool(module.get("num_experts")))
        k = min(S.numel(), S_ref.numel())
        top = float(S_ref[0]) if S_ref.numel() else 0.0
        atol = 1e-5 * top
        torch.testing.assert_close(S[:k], S_ref[:k], rtol=1e-5, atol=atol)
        assert (S_ref[k:] <= atol).all() and (S[k:] <= atol).all(), key  # beyond our rank: zero in theirs
    assert not by_name, f"modules not in expected.json: {list(by_name)}"


def test_litgpt_without_its_model_config_is_refused_naming_it():
    folder = FIXTURES / "litgpt_lora"
    with pytest.raises(AdapterFormatError, match=r"model_config\.yaml") as info:
        load_adapter(folder / "lit_model.pth.lora")
    assert "\n" not in str(info.value) and "attn.qkv" in str(info.value)


def test_loralib_without_base_shapes_reads_linear_and_says_so():
    with pytest.warns(UserWarning, match="alpha unknown"):
        adapter = load_adapter(FIXTURES / "loralib_linear_conv_embedding" / "lora.pt")
    assert adapter.info("conv").kind == "lora"  # a Conv2d cannot be told from a Linear here
    assert any("do not record layer types" in note for note in adapter.notes)


def test_target_parameters_need_base_shapes_when_a_module_has_several(tmp_path):
    with pytest.raises(AdapterFormatError, match="parameter order"):
        load_adapter(FIXTURES / "peft_target_parameters")


def test_dora_fixture_spectrum_needs_the_base_weight():
    adapter = load_adapter(FIXTURES / "peft_dora")
    with pytest.raises(Exception, match="base weight"):
        module_spectrum(adapter["head"], device="cpu")
    direction = adapter.dora_directions()["head"]
    assert direction.kind == "dora-direction" and "direction update" in " ".join(direction.info.notes)
