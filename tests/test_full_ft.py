"""Full fine-tuning (`train(method="full")`): nothing frozen, a Hugging Face model directory that
transformers loads with the trained logits, sharding, bit-identical resume, the output
directory's rules across methods, sweeps with full fine-tuning cells."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from training_fixtures import save_tiny_bert, train_until_second_checkpoint, training_assets

from lora_analysis import LoraAnalysisError, TrainConfig, evaluate, load_adapter, run_sweep, train
from lora_analysis.cli.main import main
from lora_analysis.training.checkpoint import load_checkpoint
from lora_analysis.training.config import DEFAULT_LR, parse_size
from lora_analysis.training.models import load_model

IDS = torch.tensor([[2, 5, 20, 7, 3], [2, 11, 12, 3, 0]])
MASK = (IDS != 0).long()
SHARD = 20_000  # bytes: the tiny BERT (85 kB of float32) is saved in several shards


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return training_assets(tmp_path_factory.mktemp("full_assets"))


def full_config(assets, **overrides) -> TrainConfig:
    values = dict(model=str(assets["bert"]), data=str(assets["csv"]), method="full", steps=40, batch_size=16, lr=5e-3,
                  progress=False)
    return TrainConfig(**{**values, **overrides})


def weight_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model*.safetensors*"))}


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(full_config(assets, eval_every=20, group_by_length=False, max_shard_size=SHARD, output_dir=out))
    return result, out


def test_full_fine_tuning_trains_every_parameter_and_learns(assets, trained):
    result, _ = trained
    assert result.adapter is None and result.metrics["method"] == "full"
    losses = result.metrics["train_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    evals = result.metrics["evals"]
    assert [e["step"] for e in evals] == [0, 20, 40] and evals[-1]["val_accuracy"] > evals[0]["val_accuracy"]

    torch.manual_seed(0)  # the same freshly initialised classifier as the run's
    fresh, _, _ = load_model(assets["bert"], "classification", ["neg", "pos"])
    trained_params = dict(result.model.named_parameters())
    assert set(trained_params) == {n for n, _ in fresh.named_parameters()}  # no LoRA layers
    assert all(p.requires_grad for p in trained_params.values())  # nothing frozen
    for name, p in fresh.named_parameters():  # and every tensor moved, embeddings and norms too
        assert not torch.equal(trained_params[name], p), f"{name} did not change"
    total = sum(p.numel() for p in fresh.parameters())
    assert result.metrics["parameters"] == {"trainable": total, "model": total}
    assert result.metrics["config"]["lr"] == 5e-3


def test_the_output_is_a_sharded_model_directory_transformers_loads_with_the_trained_logits(assets, trained):
    from transformers import AutoModelForSequenceClassification

    result, out = trained
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 2 and "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert {"config.json", "metrics.json", "tokenizer_config.json"} <= set(names)
    assert not [n for n in names if n.startswith(".") or n == "checkpoint.pt"]  # no staging or temp files left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard within the threshold, unless one tensor alone is larger
        with safe_open(str(out / shard), framework="pt") as f:
            sizes = [math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys()]
        assert sum(sizes) <= SHARD or len(sizes) == 1, (shard, sizes)

    loaded = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS, attention_mask=MASK).logits,
                           result.model.eval()(input_ids=IDS, attention_mask=MASK).logits)
    # evaluate() on the directory reproduces the run's last validation exactly
    assert evaluate(out, progress=False).metrics == {k: v for k, v in result.metrics["final"].items() if k != "step"}


def test_gpt2_full_fine_tuning_is_one_file_below_the_threshold_and_loads_as_a_causal_lm(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    config = TrainConfig(model=str(assets["gpt2"]), task="causal-lm", data=str(assets["txt"]), method="full",
                         steps=20, batch_size=8, lr=3e-3, eval_every=20, progress=False, output_dir=tmp_path)
    result = train(config)
    first, last = result.metrics["evals"][0], result.metrics["evals"][-1]
    assert last["val_loss"] < first["val_loss"] - 0.1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-")]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, result.model.eval()(input_ids=IDS).logits)
    assert evaluate(tmp_path, progress=False).metrics == {k: v for k, v in last.items() if k != "step"}


def test_full_resume_after_a_crash_is_bit_identical_and_checkpoints_hold_everything(assets, tmp_path, monkeypatch):
    config = full_config(assets, steps=9, checkpoint_every=3, eval_every=4, max_shard_size=SHARD)
    reference = train(config, output_dir=tmp_path / "straight")

    train_until_second_checkpoint(monkeypatch, config, tmp_path / "crashed")
    state = load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")
    model_params = {n for n, _ in reference.model.named_parameters()}
    assert set(state["trainable"]) == model_params  # the whole model ...
    assert len(state["optimizer"]["state"]) == len(model_params)  # ... and Adam's moments of every parameter
    assert not list((tmp_path / "crashed").glob("model*"))

    resumed = train(config, output_dir=tmp_path / "crashed", resume=True)
    assert resumed.status == "resumed"
    assert weight_bytes(tmp_path / "crashed") == weight_bytes(tmp_path / "straight") != {}
    for key in ("train_loss", "evals", "steps"):
        assert resumed.metrics[key] == reference.metrics[key], key
    again = train(config, output_dir=tmp_path / "crashed", resume=True)
    assert again.status == "finished" and again.adapter is None and again.model is None


def test_resume_of_a_full_run_ignores_lora_settings_and_takes_the_default_lr_as_spelled_out(assets, tmp_path):
    train(full_config(assets, steps=2, lr=None), output_dir=tmp_path)
    same = train(full_config(assets, steps=2, lr=DEFAULT_LR["full"], r=64, targets=["key"]), output_dir=tmp_path, resume=True)
    assert same.status == "finished"
    with pytest.raises(LoraAnalysisError, match=r"metrics\.json: cannot resume.*lr: 5e-05 -> 0\.001"):
        train(full_config(assets, steps=2, lr=1e-3), output_dir=tmp_path, resume=True)
    with pytest.raises(LoraAnalysisError, match=r"metrics\.json: cannot resume.*method: full -> lora"):
        train(full_config(assets, steps=2, method="lora", lr=DEFAULT_LR["full"]), output_dir=tmp_path, resume=True)


def test_overwrite_across_methods_leaves_one_models_weights(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train(full_config(assets, steps=2, max_shard_size=SHARD), output_dir=out)
    sharded = sorted(p.name for p in out.glob("model*"))
    assert len(sharded) >= 3
    argv = ["train", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--steps", "2", "--batch-size", "4",
            "--output-dir", str(out), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2  # a model directory is not replaced without --overwrite
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lora-analysis: error: {out}: holds a model (metrics.json, model-0000") and "--overwrite" in err

    assert main([*argv, "--overwrite"]) == 0  # LoRA over full: the model's weights go
    assert not list(out.glob("model*")) and load_adapter(out).config.r == 8
    assert main([*argv, "--method", "full", "--overwrite"]) == 0  # full (one file now) over LoRA: the adapter goes
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not {"adapter_model.safetensors", "adapter_config.json"} & names
    assert not [n for n in names if n.startswith("model-")]  # nor stale shards of the first run
    assert json.loads((out / "metrics.json").read_text())["method"] == "full"


def test_the_model_being_trained_is_never_the_output_directory(assets, tmp_path, capsys):
    model = tmp_path / "bert"
    save_tiny_bert(model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for extra in ([], ["--overwrite"], ["--method", "full", "--overwrite"]):
        capsys.readouterr()
        assert main(["train", "--model", str(model), "--data", str(assets["csv"]), "--steps", "1", "--output-dir",
                     str(model), "--quiet", *extra]) == 2
        assert "is the directory of the model being trained (--model)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_cli_full_fine_tuning_and_sizes(assets, tmp_path, capsys):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5kb") == 1500
    for bad in ("", "5 parsecs", "0", "-1MB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    out = tmp_path / "full"
    capsys.readouterr()
    assert main(["train", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--method", "full", "--steps", "2",
                 "--batch-size", "4", "--max-shard-size", "20kB", "--output-dir", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith(f"{out}: val_accuracy ") and "[trained]" in captured.out
    assert (out / "model.safetensors.index.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == "full" and metrics["config"]["lr"] == DEFAULT_LR["full"]


def test_a_sweep_trains_lora_and_full_fine_tuning_cells_into_one_run_directory(assets, tmp_path):
    base = TrainConfig(model=str(assets["bert"]), data=str(assets["csv"]), steps=3, batch_size=8, lr=0.05, progress=False)
    result = run_sweep(base, tmp_path, ranks=[2], seeds=[0, 1], target_sets=[["query"]], methods=["lora", "full"],
                       full_lr=5e-3)
    assert list(result.cells) == ["r2-s0-query", "r2-s1-query", "full-s0", "full-s1"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["grid"]["methods"] == ["lora", "full"] and manifest["grid"]["full_lr"] == 5e-3
    cells = manifest["cells"]
    assert cells["full-s1"]["method"] == "full" and cells["full-s1"]["seed"] == 1 and cells["full-s1"]["lr"] == 5e-3
    assert cells["r2-s0-query"]["method"] == "lora" and cells["r2-s0-query"]["lr"] == 0.05
    assert (tmp_path / "full-s1" / "config.json").is_file() and (tmp_path / "r2-s1-query" / "adapter_config.json").is_file()
    # a full cell is exactly the standalone run
    train(base, method="full", lr=5e-3, seed=1, output_dir=tmp_path / "alone")
    assert weight_bytes(tmp_path / "alone") == weight_bytes(tmp_path / "full-s1")

    stamps = {n: (p / "metrics.json").stat().st_mtime_ns for n, p in result.cells.items()}
    again = run_sweep(base, tmp_path, ranks=[2], seeds=[0, 1], target_sets=[["query"]], methods=["lora", "full"], full_lr=5e-3)
    assert {n: (p / "metrics.json").stat().st_mtime_ns for n, p in again.cells.items()} == stamps
    with pytest.raises(LoraAnalysisError, match=r"manifest\.json: cannot resume.*full_lr: 0\.005 -> 5e-05"):
        run_sweep(base, tmp_path, ranks=[2], seeds=[0], target_sets=[["query"]], methods=["full"])
    with pytest.raises(LoraAnalysisError, match="methods must be distinct"):
        run_sweep(base, tmp_path, ranks=[2], seeds=[0], target_sets=[["query"]], methods=["lora", "lora"])


def test_sweep_cli_with_full_cells_only_needs_no_ranks(assets, tmp_path, capsys):
    argv = ["sweep", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--steps", "2", "--batch-size", "4",
            "--methods", "full", "--seeds", "0", "--full-lr", "0.005", "--output-dir", str(tmp_path), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("full-s0: val_accuracy ") and lines[-1] == f"manifest: {tmp_path / 'manifest.json'}"
    assert main(["sweep", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--output-dir", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "--ranks is required for LoRA cells" in capsys.readouterr().err


@pytest.mark.integration
def test_minilm_full_fine_tuning_a_few_steps(tmp_path):
    """The built-in default, fully fine-tuned for two steps: a MiniLM classification directory."""
    from transformers import AutoModelForSequenceClassification

    result = train(method="full", steps=2, batch_size=8, val_fraction=0.02, output_dir=tmp_path, progress=False)
    assert result.metrics["parameters"]["trainable"] == result.metrics["parameters"]["model"] > 22_000_000
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.tensor([[101, 2307, 3185, 102]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    assert evaluate(tmp_path, progress=False).metrics == {k: v for k, v in result.metrics["final"].items() if k != "step"}
