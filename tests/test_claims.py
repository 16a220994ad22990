"""The Section 7 verdict rules on synthetic sweeps whose answers are known.

Planted: every adapter's directions are built from the pretrained W's singular vectors and a
planted input direction, so (a), (b) and (d) must hold and (c) holds (trivially, as it does
for any ΔW whose norm changes little with r). Random: every factor is Gaussian, so ΔW's
directions are Haar-random and nothing may hold except what holds under the null.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_analysis import LoraConfig, save_adapter
from lora_analysis.adapters import Adapter, LoraModule
from lora_analysis.reproduce import ReproduceConfig, Runs, Section7, section7_claims
from lora_analysis.training import cell_name

D, LAYERS, TARGETS, RANKS, SEEDS = 96, 6, ["query", "value"], (4, 8, 64), (0, 1)
SIGMA = 1.0 + 40.0 * 0.5 ** np.arange(1, D + 1)  # W's spectrum: a few large values on a plateau


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.sign(np.diag(R))


def _complete(first: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(D, k) orthonormal whose first column is ±`first` (D, 1), the rest random."""
    return np.linalg.qr(np.hstack([first, rng.standard_normal((D, k - 1))]))[0]


def _module(left: np.ndarray, right: np.ndarray) -> LoraModule:
    """ΔW = left diag(s) rightᵀ with distinct s, and A's right-singular vectors = right's columns in order."""
    r = left.shape[1]
    a = np.linspace(1.0, 0.5, r)  # A's singular values, distinct so its directions are defined
    s = np.linspace(2.0, 1.0, r)  # ΔW's singular values
    A = a[:, None] * right.T
    B = left * (s / a)[None, :]
    return LoraModule(torch.tensor(A, dtype=torch.float32), torch.tensor(B, dtype=torch.float32), alpha=float(r))


def _planted(rng, r, seed, target, layer, P, Q, shared_v):
    """Planted factors (see the module docstring) for one module."""
    if target == "query":
        if r == 4:  # inside W's plateau, not its top: closer to W than random, < 10 % of W's own top-4
            return _module(P[:, 8:12], Q[:, 8:12])
        if r == 8:
            return _module(_complete(P[:, :1], 8, rng), _complete(Q[:, :1], 8, rng))
        return _module(P[:, :64], Q[:, :64])  # both seeds share W's top 64 directions
    right = _complete(shared_v[layer][:, None], r, rng)  # v: seeds share only the top direction
    return _module(_complete(rng.standard_normal((D, 1)), r, rng), right)


def _random(rng, r, *_):
    return LoraModule(torch.tensor(rng.standard_normal((r, D)), dtype=torch.float32),
                      torch.tensor(rng.standard_normal((D, r)), dtype=torch.float32), alpha=float(r))


def _sweep(tmp_path, build) -> Section7:
    rng = np.random.default_rng(0)
    weights, bases = {}, {}
    for layer in range(LAYERS):
        for target in TARGETS:
            P, Q = _orthogonal(rng, D), _orthogonal(rng, D)
            bases[(target, layer)] = (P, Q)
            weights[f"encoder.layer.{layer}.attention.self.{target}.weight"] = torch.tensor((P * SIGMA) @ Q.T, dtype=torch.float32)
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file(weights, str(model / "model.safetensors"))
    shared_v = {layer: _orthogonal(rng, D)[:, 0] for layer in range(LAYERS)}
    cells = {}
    for r in RANKS:
        for seed in SEEDS:
            modules = {}
            for layer in range(LAYERS):
                for target in TARGETS:
                    P, Q = bases[(target, layer)]
                    modules[f"bert.encoder.layer.{layer}.attention.self.{target}"] = build(rng, r, seed, target, layer, P, Q, shared_v)
            name = cell_name(r, seed, TARGETS)
            cells[name] = save_adapter(Adapter(modules, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS)), tmp_path / name)
    config = ReproduceConfig(model=str(model), run_dir=tmp_path, out=tmp_path / "out", ranks=RANKS, null_draws=400, progress=False)
    return Section7(Runs(config, cells))


def _claims(tmp_path_factory, build) -> tuple[Section7, dict]:
    root = tmp_path_factory.mktemp(build.__name__.strip("_"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_ANALYSIS_CACHE", str(root / "cache"))  # W's SVD cache stays in the test's folder
        s7 = _sweep(root, build)
        return s7, {c.key: c for c in section7_claims(s7)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _claims(tmp_path_factory, _planted)


@pytest.fixture(scope="module")
def random_world(tmp_path_factory):
    return _claims(tmp_path_factory, _random)


def test_planted_directions_make_the_claims_hold(planted):
    s7, claims = planted
    a, b, c, d = (claims[k] for k in "abcd")
    assert [p.test.n for p in a.parts] == [12, 12] and a.verdict == "holds"
    assert all(p.test.median > 0.99 and p.null_pass_rate < 1e-6 for p in a.parts)
    assert b.parts[0].test.n == 6 and b.verdict == "holds"  # 6/6 layers, p = 1/32
    assert b.parts[0].test.p_value == pytest.approx(2 / 64)
    assert c.verdict == "holds trivially under the null"  # random directions give amp(4) > amp(64) as well
    assert c.parts[0].null_pass_rate > 0.5
    not_top, above4, above64 = d.parts
    assert not_top.verdict == "holds trivially under the null"
    assert above4.verdict == above64.verdict == "holds" and not above4.trivial
    assert above4.null_pass_rate == pytest.approx(79 / 4096)  # the sign test's own size at n = 12
    assert d.verdict == "holds"
    # (d)'s r = 4 directions are W's singular vectors 9..12: ‖UᵀWV‖ = √Σσ², exactly
    norms = s7.projections("query", 0, 0)[4]
    assert norms.delta == pytest.approx(np.sqrt(np.sum(SIGMA[8:12] ** 2)), rel=1e-5)


def test_random_directions_hold_nothing_beyond_the_null(random_world):
    _, claims = random_world
    a, b, c, d = (claims[k] for k in "abcd")
    assert a.verdict == "does not hold"  # φ(1, 1) near chance 1/d, far below 0.5 in every unit
    assert all(p.test.other_side == 12 for p in a.parts)
    assert b.verdict == "inconclusive"
    assert c.verdict == "holds trivially under the null"
    not_top, above4, above64 = d.parts
    assert not_top.verdict == "holds trivially under the null"
    assert above4.test.verdict != "holds" and above64.test.verdict != "holds"
    for part in (above4, above64):  # at chance: ratios to the null median straddle 1
        assert part.test.ci_low < 1.0 < part.test.ci_high
    assert d.verdict != "holds"


def test_claims_serialize_with_their_numbers(random_world):
    claim = random_world[1]["a"].to_dict()
    part = claim["parts"][0]
    assert len(part["units"]) == len(part["values"]) == 12 and part["units"][0] == "layer 0, seed 0"
    assert {"median", "ci_low", "ci_high", "ci_coverage", "p_value", "n"} <= part["test"].keys()
    assert "Beta(1/2" in part["null"] and part["verdict"] == "does not hold"
