"""Output rules (`lora_analysis.outputs`) through the real CLI: an input is never written over,
an existing file is replaced only with --force, no folder is created, two outputs differ."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from lora_analysis import Adapter, LoraConfig, LoraModule, save_adapter
from lora_analysis.cli import main
from lora_analysis.fileio import atomic_write_text
from lora_analysis.errors import InputFileError
from lora_analysis.outputs import OutputError, check_outputs


def tiny_adapter(seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {f"layers.{i}.q": LoraModule(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 4.0)
               for i in range(2)}
    return Adapter(modules, LoraConfig(r=2, lora_alpha=4.0, target_modules=list(modules)))


@pytest.fixture
def peft_dir(tmp_path: Path) -> Path:
    return save_adapter(tiny_adapter(), tmp_path / "adapter")


@pytest.fixture
def lone_file(tmp_path: Path) -> Path:
    return save_adapter(tiny_adapter(1), tmp_path / "lone.safetensors")


def digests(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def refused(argv: list[str], capfd, *needles: str) -> str:
    """Run the CLI: exit 2, one line on stderr containing every needle, nothing on stdout."""
    assert main([*argv, "--quiet"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("lora-analysis: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("force", [False, True])
def test_analyze_never_writes_over_its_input_file(lone_file, capfd, force):
    before = digests(lone_file)
    refused(["analyze", str(lone_file), "-o", str(lone_file), *(["--force"] if force else [])], capfd,
            "would write over the input")
    assert digests(lone_file) == before


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_analyze_never_writes_over_a_file_of_its_input_directory(peft_dir, capfd, name):
    before = digests(peft_dir / "adapter_model.safetensors", peft_dir / "adapter_config.json")
    refused(["analyze", str(peft_dir), "-o", str(peft_dir / name), "--force"], capfd, str(peft_dir / name), "input")
    assert digests(peft_dir / "adapter_model.safetensors", peft_dir / "adapter_config.json") == before


def test_links_and_dotdot_paths_to_an_input_are_refused(peft_dir, lone_file, tmp_path, capfd):
    symlink = tmp_path / "link.json"
    symlink.symlink_to(peft_dir / "adapter_config.json")
    hardlink = tmp_path / "hard.safetensors"
    os.link(lone_file, hardlink)
    dotdot = peft_dir / ".." / peft_dir.name / "adapter_model.safetensors"
    for output, inputs in ((symlink, [peft_dir]), (hardlink, [lone_file]), (dotdot, [peft_dir])):
        refused(["analyze", str(inputs[0]), "-o", str(output), "--force"], capfd, "would write over the input")
    assert symlink.is_symlink() and os.stat(hardlink).st_nlink == 2


def test_compare_output_and_plot_onto_an_input_are_refused(peft_dir, lone_file, capfd):
    before = digests(lone_file, peft_dir / "adapter_config.json")
    refused(["compare", str(peft_dir), str(lone_file), "-o", str(peft_dir / "adapter_config.json"), "--force"],
            capfd, "adapter_config.json", "-o would write over the input")
    refused(["compare", str(peft_dir), str(lone_file), "--plot", str(lone_file.with_suffix(".png")), "-o",
             str(lone_file), "--force"], capfd, "-o would write over the input")
    assert digests(lone_file, peft_dir / "adapter_config.json") == before


def test_plot_onto_an_input_is_refused(peft_dir, tmp_path, capfd):
    image = tmp_path / "input.png"  # an input that happens to carry a figure's extension
    image.symlink_to(peft_dir / "adapter_model.safetensors")
    refused(["compare", str(peft_dir), str(peft_dir), "--plot", str(image), "--force"], capfd,
            "--plot would write over the input")


def test_an_existing_file_is_replaced_only_with_force(peft_dir, tmp_path, capfd):
    report = tmp_path / "report.json"
    report.write_text("the user's own file")
    refused(["analyze", str(peft_dir), "--format", "json", "-o", str(report)], capfd, str(report), "--force")
    assert report.read_text() == "the user's own file"
    assert main(["analyze", str(peft_dir), "--format", "json", "-o", str(report), "--force", "--quiet"]) == 0
    assert report.read_text().startswith("{")


def test_an_existing_plot_is_replaced_only_with_force(peft_dir, tmp_path, capfd):
    plot = tmp_path / "phi.png"
    plot.write_bytes(b"mine")
    refused(["compare", str(peft_dir), str(peft_dir), "--plot", str(plot)], capfd, str(plot), "--force")
    assert plot.read_bytes() == b"mine"
    assert main(["compare", str(peft_dir), str(peft_dir), "--plot", str(plot), "--force", "--quiet"]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("command", ["analyze", "compare"])
def test_no_folder_is_created(peft_dir, tmp_path, capfd, command):
    output = tmp_path / "no" / "such" / "folder" / "report.json"
    inputs = [str(peft_dir)] * (2 if command == "compare" else 1)
    refused([command, *inputs, "-o", str(output)], capfd, str(output), "folder", "does not exist")
    assert not (tmp_path / "no").exists()


def test_a_folder_or_a_file_used_as_folder_is_refused(peft_dir, tmp_path, capfd):
    (tmp_path / "taken").mkdir()
    refused(["analyze", str(peft_dir), "-o", str(tmp_path / "taken")], capfd, "names a directory")
    (tmp_path / "file").write_text("")
    plot = tmp_path / "file" / "phi.png"
    refused(["compare", str(peft_dir), str(peft_dir), "--plot", str(plot)], capfd, str(plot), "is not a directory")


def test_two_outputs_naming_one_file_are_refused(peft_dir, tmp_path, capfd):
    out = tmp_path / "same.png"
    refused(["compare", str(peft_dir), str(peft_dir), "-o", str(out), "--plot", str(tmp_path / "." / "same.png")],
            capfd, "-o and --plot name the same file")
    assert not out.exists()


def test_base_weights_are_inputs_too(peft_dir, tmp_path, capfd):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    refused(["analyze", str(peft_dir), "--base", str(base), "-o", str(base), "--force"], capfd, "input")
    assert base.read_bytes() == b"weights"


def test_a_file_appearing_during_the_work_is_not_replaced(tmp_path):
    """Without --force the final rename is a no-clobber link: a file created after the check stays."""
    target = tmp_path / "late.txt"
    check_outputs({"-o": target}, [], force=False)
    target.write_text("created meanwhile")
    with pytest.raises(InputFileError, match="exists"):
        atomic_write_text(target, "report", overwrite=False)
    assert target.read_text() == "created meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["late.txt"]  # no temp file left behind


def test_check_outputs_api(tmp_path, peft_dir):
    check_outputs({"-o": None, "--plot": tmp_path / "new.png"}, [peft_dir, None])  # nothing to refuse
    with pytest.raises(OutputError):
        check_outputs({"-o": peft_dir / "adapter_config.json"}, [peft_dir], force=True)


def test_directory_outputs(tmp_path, peft_dir):
    """A command writing an adapter directory may create that one directory, not its parents;
    an existing one that holds files needs --force; an input directory never."""
    check_outputs({"-o": tmp_path / "new-adapter"}, [peft_dir], directories=["-o"])
    empty = tmp_path / "empty"
    empty.mkdir()
    check_outputs({"-o": empty}, [peft_dir], directories=["-o"])
    with pytest.raises(OutputError, match="holds files; pass --force"):
        check_outputs({"-o": peft_dir.parent}, [], directories=["-o"])
    check_outputs({"-o": peft_dir.parent}, [], directories=["-o"], force=True)
    with pytest.raises(OutputError, match="would write over the input"):
        check_outputs({"-o": peft_dir}, [peft_dir], directories=["-o"], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_outputs({"-o": tmp_path / "a" / "b"}, [], directories=["-o"])
    with pytest.raises(OutputError, match="names a file"):
        check_outputs({"-o": peft_dir / "adapter_config.json"}, [], directories=["-o"], force=True)
