"""The small rules every package uses: one seeding scheme, one device rule."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lora_analysis.devices import resolve_device
from lora_analysis.errors import LoraAnalysisError
from lora_analysis.seeding import derive_seed, random_basis, seeded_generator


def test_derive_seed_is_sha256_of_the_named_stream():
    digest = hashlib.sha256(b"3:encoder.layer.0.attention.self.query:8").digest()
    assert derive_seed(3, "encoder.layer.0.attention.self.query", 8) == int.from_bytes(digest[:8], "little")
    assert derive_seed(0) == int.from_bytes(hashlib.sha256(b"0").digest()[:8], "little")


def test_streams_of_neighbouring_seeds_and_contexts_are_distinct_and_reproducible():
    seeds = {derive_seed(s, name, r) for s in range(3) for name in ("a.q", "a.v") for r in (4, 8)}
    assert len(seeds) == 12
    draw = [torch.randn(5, generator=seeded_generator(7, "x")) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    first = torch.stack([torch.randn(1, generator=seeded_generator(s)) for s in range(200)]).squeeze()
    second = torch.stack([torch.randn(2, generator=seeded_generator(s))[1] for s in range(200)])
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.25  # ~3.5 standard errors


def test_random_basis_is_orthonormal_and_float64():
    Q = random_basis(20, 5, seeded_generator(1))
    assert Q.dtype == torch.float64 and Q.shape == (20, 5)
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=torch.float64))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(LoraAnalysisError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(LoraAnalysisError, match="CUDA is not available"):
            resolve_device("cuda:1")
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
