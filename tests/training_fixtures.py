"""Tiny offline models and data for the training tests: saved with save_pretrained into a
directory, exactly as a user's local model would be, with a word-level tokenizer we write."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "superb", "lovely", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILLER = ["the", "film", "movie", "plot", "was", "very", "a", "story", "cast", "and"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER


def save_tokenizer(directory: Path) -> None:
    from transformers import BertTokenizer

    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(directory)


def save_tiny_bert(directory: Path, dropout: float = 0.1) -> Path:
    """A bare 2-layer BertModel (checkpoint keys without `bert.`, like MiniLM) + tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def save_tiny_gpt2(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3, pad_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, "pos"/"neg") where one sentiment word decides the label: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_sentiment_csv(path: Path, n: int = 200, seed: int = 0) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sentiment_rows(n, seed))
    return path


def write_corpus_txt(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Repetitive word sequences a tiny causal LM can learn quickly."""
    rng = random.Random(seed)
    lines = [" ".join(FILLER[(start + k) % len(FILLER)] for k in range(8)) for start in (rng.randrange(len(FILLER)) for _ in range(n))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def adapter_bytes(directory: Path) -> bytes:
    """The adapter file, byte for byte (save_adapter writes equal adapters as equal bytes)."""
    return (directory / "adapter_model.safetensors").read_bytes()


def training_assets(root: Path) -> dict[str, Path]:
    """The tiny BERT and GPT-2, a sentiment CSV and a text corpus under `root`."""
    return {
        "bert": save_tiny_bert(root / "bert"),
        "gpt2": save_tiny_gpt2(root / "gpt2"),
        "csv": write_sentiment_csv(root / "sentiment.csv"),
        "txt": write_corpus_txt(root / "corpus.txt"),
    }


def train_until_second_checkpoint(monkeypatch, config, output_dir: Path) -> list[int]:
    """Train `config` into `output_dir`, the process "dying" (RuntimeError) right after its 2nd
    checkpoint is saved; returns the steps checkpointed."""
    import pytest

    from lora_analysis import train
    from lora_analysis.training import loop

    save, calls = loop.save_checkpoint, []

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(kwargs["step"])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, output_dir=output_dir)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    return calls
