"""Seeds and seeded random draws: one scheme for every random number the package draws.

A draw is named by an integer seed and a context (a module name, a rank, ...). The context
selects an independent stream: `derive_seed(seed, *context)` is the first 8 bytes of the
SHA-256 of "seed:part:part...", so streams of different contexts, and of neighbouring seeds,
are unrelated (torch generators seeded with consecutive small integers give measurably
correlated first draws). Module paths never contain ':', so the text names the context
unambiguously. Generators are CPU generators: the same seed gives the same numbers on every
device.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *context: str | int) -> int:
    """A 64-bit seed for the stream named by (`seed`, `context`)."""
    text = ":".join(str(part) for part in (seed, *context))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def seeded_generator(seed: int, *context: str | int) -> torch.Generator:
    """A CPU `torch.Generator` for the stream named by (`seed`, `context`)."""
    return torch.Generator().manual_seed(derive_seed(seed, *context))


def random_basis(d: int, k: int, generator: torch.Generator, count: int | None = None) -> torch.Tensor:
    """Uniformly random orthonormal (d, k), float64 — or `count` independent ones, (count, d, k):
    QR of a Gaussian matrix with sign-fixed R (the sign fix makes Q Haar-distributed, not just
    orthonormal)."""
    shape = (d, k) if count is None else (count, d, k)
    Q, R = torch.linalg.qr(torch.randn(*shape, generator=generator, dtype=torch.float64))
    signs = torch.diagonal(R, dim1=-2, dim2=-1)
    return Q * torch.sign(signs).where(signs != 0, torch.ones(())).unsqueeze(-2)
