"""Every bad adapter file gives one AdapterFormatError line naming the file and the problem."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lora_analysis import Adapter, AdapterFormatError, LoraModule, load_adapter, save_adapter

P = "base_model.model.layer.fc"


def good_tensors(r=2, d_in=6, d_out=5):
    return {f"{P}.lora_A.weight": torch.randn(r, d_in), f"{P}.lora_B.weight": torch.randn(d_out, r)}


def assert_refused(path, problem: str):
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message, message
    assert problem in message, message
    return message


def write(path, tensors, metadata=None):
    save_file(tensors, path, metadata=metadata or {"format": "pt"})
    return path


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "absent.safetensors", "no such file")


def test_directory_without_weights(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    assert_refused(tmp_path / "empty_dir", "holds no adapter_model.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 40, -7])
def test_truncated_file(tmp_path, keep):
    data = write(tmp_path / "full.safetensors", good_tensors()).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    assert_refused(cut, "truncated")


def test_corrupt_header(tmp_path):
    data = bytearray(write(tmp_path / "ok.safetensors", good_tensors()).read_bytes())
    data[8] = ord("[")  # header JSON no longer parses
    bad = tmp_path / "bad_header.safetensors"
    bad.write_bytes(bytes(data))
    assert_refused(bad, "corrupt safetensors header")
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    assert_refused(huge, "corrupt safetensors header")


def test_corrupt_config_in_header_and_beside(tmp_path):
    assert_refused(write(tmp_path / "hdr.safetensors", good_tensors(), {"adapter_config": "{not json"}), "not valid JSON")
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "adapter_model.safetensors", good_tensors())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "eight"}))
    message = assert_refused(tmp_path / "d", "'r'")
    assert "adapter_config.json" in message


def test_config_disagrees_with_tensors(tmp_path):
    config = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16})
    assert_refused(write(tmp_path / "r.safetensors", good_tensors(r=2), {"adapter_config": config}), "rank 8")


@pytest.mark.parametrize("config,problem", [({"peft_type": "IA3"}, "only LORA"), ({"use_dora": True}, "DoRA")])
def test_unsupported_adapter_kinds(tmp_path, config, problem):
    assert_refused(write(tmp_path / "kind.safetensors", good_tensors(), {"adapter_config": json.dumps(config)}), problem)


def test_dora_magnitude_tensor(tmp_path):
    tensors = {**good_tensors(), f"{P}.lora_magnitude_vector": torch.ones(5)}
    # Issue 10: a lone PEFT file with magnitudes is DoRA, read as such (α unknown: no config).
    with pytest.warns(UserWarning, match="alpha unknown"):
        assert load_adapter(write(tmp_path / "dora.safetensors", tensors)).info("layer.fc").kind == "dora"
    not_dora = {"adapter_config": json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})}
    assert_refused(write(tmp_path / "dora_config.safetensors", tensors, not_dora), "does not set use_dora")
    unknown = {**good_tensors(), f"{P}.lora_Q.weight": torch.ones(2, 6)}
    assert_refused(write(tmp_path / "unknown.safetensors", unknown), "unsupported LoRA tensor")


@pytest.mark.parametrize("drop,problem", [("lora_B", "has lora_A but no lora_B"), ("lora_A", "has lora_B but no lora_A")])
def test_one_factor_missing(tmp_path, drop, problem):
    tensors = {k: v for k, v in good_tensors().items() if drop not in k}
    assert_refused(write(tmp_path / "half.safetensors", tensors), problem)


def test_rank_mismatch(tmp_path):
    tensors = {f"{P}.lora_A.weight": torch.randn(2, 6), f"{P}.lora_B.weight": torch.randn(5, 3)}
    assert_refused(write(tmp_path / "ranks.safetensors", tensors), "rank mismatch")


def test_non_2d_factor(tmp_path):
    tensors = {f"{P}.lora_A.weight": torch.randn(2, 6, 1), f"{P}.lora_B.weight": torch.randn(5, 2)}
    assert_refused(write(tmp_path / "3d.safetensors", tensors), "3-D")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, value):
    tensors = good_tensors()
    tensors[f"{P}.lora_B.weight"][1, 1] = value
    assert_refused(write(tmp_path / "nonfinite.safetensors", tensors), "NaN/Inf")
    extra = {**good_tensors(), "base_model.model.classifier.weight": torch.full((2, 2), value)}
    assert_refused(write(tmp_path / "nonfinite_extra.safetensors", extra), "classifier.weight")


def test_unknown_key_layout(tmp_path):
    assert_refused(write(tmp_path / "model.safetensors", {"encoder.weight": torch.ones(2, 2)}), "unknown key layout")
    mixed = {**good_tensors(), "te.lora_down.weight": torch.ones(2, 6), "te.lora_up.weight": torch.ones(5, 2)}
    assert_refused(write(tmp_path / "mixed.safetensors", mixed), "mixes key layouts")
    kohya_extra = {"te.lora_down.weight": torch.ones(2, 6), "te.lora_up.weight": torch.ones(5, 2), "te.hada_w1": torch.ones(2)}
    assert_refused(write(tmp_path / "kohya_extra.safetensors", kohya_extra), "unexpected key 'te.hada_w1'")


def test_empty_adapter(tmp_path):
    assert_refused(write(tmp_path / "empty.safetensors", {}), "empty adapter")
    with pytest.raises(Exception, match="empty adapter"):
        save_adapter(Adapter({}), tmp_path / "out")


class Payload:
    """Unpickling this would create a marker file: proof that we never unpickle."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_file_is_refused_without_executing(tmp_path):
    Payload.marker = tmp_path / "executed"
    evil = tmp_path / "adapter_model.bin"
    with open(evil, "wb") as f:
        pickle.dump({"x.lora_A": Payload()}, f, protocol=2)
    assert_refused(evil, "refused pickle")
    assert not Payload.marker.exists()
    torch.save({"x.lora_A": torch.ones(2, 3), "note": Payload()}, tmp_path / "zipped.pt")
    Payload.marker.unlink(missing_ok=True)
    assert_refused(tmp_path / "zipped.pt", "refused pickle")
    assert not Payload.marker.exists()


def test_torch_file_not_a_flat_tensor_dict_or_truncated(tmp_path):
    torch.save([torch.ones(2, 2)], tmp_path / "list.pt")
    assert_refused(tmp_path / "list.pt", "flat dict of named tensors")
    torch.save({"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.ones(4, 2)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path / "cut.pt", "truncated or corrupt torch file")


def test_saving_over_a_file_as_directory(tmp_path):
    (tmp_path / "taken").write_text("x")
    adapter = Adapter({"fc": LoraModule(torch.ones(2, 3), torch.ones(4, 2), alpha=2)})
    with pytest.raises(AdapterFormatError, match="not a directory"):
        save_adapter(adapter, tmp_path / "taken")
