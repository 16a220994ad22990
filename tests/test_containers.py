"""The containers under the readers (bounded, on demand) and reader properties (hypothesis)."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_analysis import load_adapter
from lora_analysis.adapters import LazyModules, containers
from lora_analysis.adapters.formats.kohya import KNOWN_WORDS, demangle
from lora_analysis.analysis import adapter_spectra, module_spectrum
from lora_analysis.errors import AdapterFormatError, LoraAnalysisError

P = "base_model.model.layer.fc"


def peft_tensors(r=2, d_in=6, d_out=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {f"{P}.lora_A.weight": torch.randn(r, d_in, generator=g).to(dtype),
            f"{P}.lora_B.weight": torch.randn(d_out, r, generator=g).to(dtype)}


def refused(path, problem: str, **kwargs) -> str:
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path, **kwargs)
    message = str(info.value)
    assert path.name in message and "\n" not in message and problem in message, message
    return message


# ---------------------------------------------------------------------------- torch files


def test_compressed_zip_member_is_refused_before_loading(tmp_path):
    """A zip bomb: torch.save's archive re-written with deflate — 8 MB of zeros in a few KB."""
    plain = tmp_path / "plain.pt"
    torch.save({"x.lora_A": torch.zeros(2, 1_000_000), "x.lora_B": torch.zeros(4, 2)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    assert bomb.stat().st_size < plain.stat().st_size / 100
    refused(bomb, "is compressed")


def test_nested_torch_file_needs_its_reader(tmp_path):
    torch.save({"state_dict": {"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.ones(4, 2)}}, tmp_path / "nested.pt")
    refused(tmp_path / "nested.pt", "whose entry 'state_dict' is a dict")


def test_torch_files_are_memory_mapped_and_read_on_demand(tmp_path):
    torch.save({"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.ones(4, 2)}, tmp_path / "l.pt")
    source = containers.open_tensor_file(tmp_path / "l.pt")
    assert isinstance(source, containers.TorchFile) and source.shape("x.lora_A") == (2, 3)
    assert source.meta("x.lora_B").device.type == "meta"


# ---------------------------------------------------------------------------- safetensors


def test_safetensors_header_with_too_many_tensors_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(containers, "MAX_TENSORS", 1000)
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(1001))
    header = ("{" + entries + "}").encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refused(path, "1001 tensors, more than the 1000")


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 4000]}, "truncated"),
    ({"dtype": "C64", "shape": [2, 3], "data_offsets": [0, 24]}, "not read"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}, "does not fill"),
    ({"dtype": "F32", "shape": "2x3", "data_offsets": [0, 24]}, "lacks a valid"),
])
def test_safetensors_header_entries_are_checked(tmp_path, entry, problem):
    header = json.dumps({"x.lora_A": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    refused(path, problem)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_factors_are_upcast_exactly(tmp_path, dtype):
    tensors = peft_tensors(dtype=dtype)
    save_file(tensors, tmp_path / "f8.safetensors")
    with pytest.warns(UserWarning, match="alpha unknown"):
        module = load_adapter(tmp_path / "f8.safetensors")["layer.fc"]
    assert module.A.dtype == torch.float32 and torch.equal(module.A, tensors[f"{P}.lora_A.weight"].float())
    S_ref = torch.linalg.svdvals(tensors[f"{P}.lora_B.weight"].double() @ tensors[f"{P}.lora_A.weight"].double())
    torch.testing.assert_close(module_spectrum(module, device="cpu").S, S_ref[:2], rtol=1e-6, atol=0)


def test_float4_factors_are_refused_in_one_line(tmp_path):
    tensors = peft_tensors()
    tensors[f"{P}.lora_A.weight"] = torch.zeros(2, 3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file(tensors, tmp_path / "f4.safetensors")
    refused(tmp_path / "f4.safetensors", "F4")


# ---------------------------------------------------------------------------- lazy modules


def test_lazy_adapter_checks_structure_now_and_values_when_read(tmp_path):
    tensors = peft_tensors()
    tensors[f"{P}.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    with pytest.warns(UserWarning, match="alpha unknown"):
        adapter = load_adapter(tmp_path / "nan.safetensors", lazy=True)
    assert isinstance(adapter.modules, LazyModules) and adapter.info("layer.fc").shape == (5, 6)
    with pytest.raises(AdapterFormatError, match=r"nan\.safetensors: .*lora_B\.weight has 1 NaN/Inf"):
        adapter_spectra(adapter, progress=False, device="cpu")
    bad = peft_tensors()
    bad[f"{P}.lora_B.weight"] = torch.ones(5, 3)
    save_file(bad, tmp_path / "ranks.safetensors")
    refused(tmp_path / "ranks.safetensors", "rank mismatch", lazy=True)


def test_lazy_modules_are_read_afresh_not_held(tmp_path):
    save_file(peft_tensors(), tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="alpha unknown"):
        adapter = load_adapter(tmp_path / "a.safetensors", lazy=True)
    first, second = adapter["layer.fc"], adapter["layer.fc"]
    assert first is not second and torch.equal(first.A, second.A)


# ---------------------------------------------------------------------------- what the readers refuse


def test_one_module_under_two_names_is_refused(tmp_path):
    tensors = {**peft_tensors(), **{k.removeprefix("base_model.model."): v for k, v in peft_tensors().items()}}
    save_file(tensors, tmp_path / "twice.safetensors")
    refused(tmp_path / "twice.safetensors", "given twice")


def test_peft_type_we_do_not_read_is_refused(tmp_path):
    save_file(peft_tensors(), tmp_path / "vera.safetensors", metadata={"adapter_config": json.dumps({"peft_type": "VERA"})})
    refused(tmp_path / "vera.safetensors", "'VERA', which is not read")


def test_diffusers_mixed_layouts_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"unet.a.to_q.lora.down.weight": torch.randn(2, 4, generator=g), "unet.a.to_q.lora.up.weight": torch.randn(4, 2, generator=g),
               "unet.a.conv.lora_A.weight": torch.randn(2, 4, generator=g), "unet.a.conv.lora_B.weight": torch.randn(4, 2, generator=g)},
              tmp_path / "pytorch_lora_weights.safetensors")
    refused(tmp_path / "pytorch_lora_weights.safetensors", "ignores the former")


def test_adapterhub_gated_lora_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"config": {"architecture": "lora", "r": 2, "alpha": 2,
                                                                         "use_gating": True}, "name": "x"}))
    torch.save({"fc.loras.x.lora_A": torch.ones(2, 3), "fc.loras.x.lora_B": torch.ones(4, 2)}, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(AdapterFormatError, match="use_gating"):
        load_adapter(tmp_path)


def test_unrepresentable_spectrum_through_the_file(tmp_path):
    tensors = {k: v.double() * 1e200 for k, v in peft_tensors().items()}
    save_file(tensors, tmp_path / "huge.safetensors", metadata={"adapter_config": json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})})
    with pytest.raises(LoraAnalysisError, match="overflows float64"):
        adapter_spectra(load_adapter(tmp_path / "huge.safetensors"), progress=False, device="cpu")


# ---------------------------------------------------------------------------- safetensors reads

READ_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool]


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(READ_DTYPES), shape=st.lists(st.integers(0, 5), max_size=3), seed=st.integers(0, 2**16))
def test_safetensors_tensors_read_as_safetensors_writes_them(tmp_path_factory, dtype, shape, seed):
    """Every dtype, scalars and empty tensors: our reads equal safetensors' own, bit for bit."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    tensors = {"t": (torch.randn(shape, generator=g) * 100).to(dtype), "scalar": torch.tensor(3, dtype=dtype)}
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_file(tensors, str(path))
    ours = containers.open_tensor_file(path)
    with safe_open(str(path), framework="pt") as theirs:
        for key in tensors:
            got, want = ours.get(key), theirs.get_tensor(key)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got.view(-1), want.view(-1)), key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int16])
def test_big_endian_hosts_reverse_each_elements_bytes(dtype):
    values = torch.tensor([1.5, -2.25, 3e3, 0.0]).to(dtype)
    little = values.view(torch.uint8)  # this test runs on a little-endian host
    swapped = little.view(-1, values.element_size()).flip(1).contiguous().view(-1)  # as a big-endian host holds them
    assert torch.equal(containers.from_little_endian(little.clone(), dtype), values)
    assert torch.equal(containers.from_little_endian(little.clone(), dtype, host_byteorder="big").view(torch.uint8), swapped)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.filterwarnings("ignore:LoRA alpha unknown")
def test_safetensors_files_are_read_not_mapped(tmp_path):
    """A memory map keeps every page it touched resident: reading a large adapter module by
    module through one would end with the whole file in the process's memory."""
    path = tmp_path / "adapter.safetensors"
    save_file(peft_tensors(r=4, d_in=4096, d_out=4096), str(path))
    adapter = load_adapter(path, lazy=True)
    for name in adapter:
        adapter[name]
    assert str(path) not in Path("/proc/self/maps").read_text()


def test_a_file_replaced_after_opening_is_not_mixed_in(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file(peft_tensors(), str(path))
    before = containers.open_tensor_file(path)
    save_file({k: v + 1 for k, v in peft_tensors().items()}, str(tmp_path / "new.safetensors"))
    (tmp_path / "new.safetensors").replace(path)  # an atomic rewrite, as a trainer saves
    key = f"{P}.lora_A.weight"
    assert torch.equal(before.get(key), peft_tensors()[key])  # the file whose header was read


def test_a_file_truncated_after_opening_is_refused_in_one_line(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file(peft_tensors(d_in=64), str(path))
    opened = containers.open_tensor_file(path)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(AdapterFormatError, match="shrank after it was opened") as info:
        for key in opened.keys():
            opened.get(key)
    assert path.name in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- properties


PLAIN_WORDS = st.sampled_from(["encoder", "layers", "attn", "block", "mlp", "fc1", "proj", "norm", "w1", "layer"])
SEGMENTS = st.one_of(PLAIN_WORDS, st.sampled_from(KNOWN_WORDS), st.integers(0, 30).map(str))


def recoverable(segments: list[str]) -> bool:
    """Whether kohya's mangling of `segments` can be undone without the model: at each segment's
    first token the longest table word is the segment itself (none for a word without "_").
    "proj.mlp" is not: mangled, it reads as the table word "proj_mlp"."""
    tokens = "_".join(segments).split("_")
    table = [tuple(word.split("_")) for word in KNOWN_WORDS]
    position = 0
    for segment in segments:
        length = len(segment.split("_"))
        longest = max((len(w) for w in table if tuple(tokens[position:position + len(w)]) == w), default=0)
        if longest != (length if "_" in segment else 0):
            return False
        position += length
    return True


@settings(max_examples=200, deadline=None)
@given(st.lists(SEGMENTS, min_size=1, max_size=8).filter(recoverable))
def test_kohya_names_demangle_to_the_model_path(segments):
    """Paths made of KNOWN_WORDS, digits and words without "_" come back from kohya's mangling
    wherever the mangled name has one reading."""
    path = ".".join(segments)
    assert demangle(path.replace(".", "_")) == path


def test_ambiguous_kohya_names_read_as_the_table_word():
    """Without the model, "proj_mlp" is read as Flux's `proj_mlp`, never as `proj.mlp`; with
    --base, names are matched against the model's own (README: kohya row of the format table)."""
    assert not recoverable(["proj", "mlp"])
    assert demangle("single_transformer_blocks_0_proj_mlp") == "single_transformer_blocks.0.proj_mlp"


@settings(max_examples=15, deadline=None)
@given(modules=st.dictionaries(st.lists(SEGMENTS, min_size=1, max_size=4).map(".".join),
                               st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.floats(0.5, 64)),
                               min_size=1, max_size=4),
       layout=st.sampled_from(["peft", "kohya", "loralib"]))
def test_factors_come_back_as_written_in_every_layout(tmp_path_factory, modules, layout):
    g = torch.Generator().manual_seed(len(modules))
    tensors, written = {}, {}
    for name, (d_out, d_in, r, alpha) in modules.items():
        A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        written[name] = (A, B, alpha)
        if layout == "peft":
            tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = A, B
        elif layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = A, B
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A, B
    path = tmp_path_factory.mktemp("layout") / ("a.pt" if layout == "loralib" else "a.safetensors")
    if layout == "loralib":
        torch.save(tensors, path)
    else:
        save_file(tensors, path)
    with pytest.warns(UserWarning) if layout != "kohya" else _nothing():
        adapter = load_adapter(path)
    assert sorted(adapter.modules) == sorted(written)
    for name, (A, B, alpha) in written.items():
        module = adapter[name]
        assert torch.equal(module.A, A) and torch.equal(module.B, B)
        assert module.alpha == (pytest.approx(alpha) if layout == "kohya" else None)
        assert adapter.info(name).component == ("unet" if layout == "kohya" else None)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
