"""Shared fixtures: tiny random models built from configs (no downloads) and tmp helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: "ci" (default) runs a fixed, derandomized budget per test so CI is quick
# and never flaky; HYPOTHESIS_PROFILE=long runs the fuzz campaign's budget (tests/test_fuzz.py).
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=700, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def tiny_bert():
    """BertForSequenceClassification, 2 layers, hidden 32, random weights, eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_gpt2():
    """GPT2LMHeadModel (Conv1D projections), 2 layers, n_embd 32, random weights, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def token_ids():
    return torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def quick_reproduction(tmp_path_factory):
    """One `reproduce --quick` run (MiniLM + Rotten Tomatoes, 4 steps per cell), shared by the
    reproduction, CLI and notebook tests: (config, results)."""
    from lora_analysis.reproduce import ReproduceConfig, reproduce

    root = tmp_path_factory.mktemp("reproduce")
    config = ReproduceConfig(quick=True, out=root / "figures", run_dir=root / "runs", progress=False)
    return config, reproduce(config, command="lora-analysis reproduce --quick")
