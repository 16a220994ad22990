"""Every update kind against its materialized ΔW (written out independently here) and a float64
SVD, on small random sizes: random shapes, ranks (also rank-deficient), conv kernels, dtypes
and magnitudes (hypothesis); and the engine's exactness over the whole float range."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_analysis.adapters import (
    AdaLoraModule,
    DenseModule,
    DoraModule,
    ExpertsModule,
    KroneckerFactor,
    LohaModule,
    LokrModule,
    LoraModule,
    TuckerModule,
)
from lora_analysis.analysis import compare_modules, module_spectrum
from lora_analysis.errors import LoraAnalysisError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64, rank: int | None = None) -> torch.Tensor:
    """Random (m, n) tensor, of rank `rank` when given (a product of two random factors)."""
    if rank is not None and len(shape) == 2:
        t = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(rank, shape[1], generator=g, dtype=torch.float64)
    else:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t.to(dtype)


def check_spectrum(update, oracle: torch.Tensor, dtype: torch.dtype, base: torch.Tensor | None = None) -> None:
    """Our S, U, V of `update` against the float64 SVD of `oracle` (d_out, d_in)."""
    spec = module_spectrum(update, device="cpu", dtype=torch.float32 if dtype != torch.float64 else torch.float64, base=base)
    S_ref = torch.linalg.svdvals(oracle)
    top = float(S_ref[0]) if S_ref.numel() else 0.0
    rtol = 1e-10 if spec.dtype == torch.float64 else 2e-5
    k = min(spec.S.numel(), S_ref.numel())
    assert spec.shape == tuple(oracle.shape)
    torch.testing.assert_close(spec.S[:k], S_ref[:k], rtol=0, atol=rtol * top + 1e-300)
    assert all(float(s) <= rtol * top + 1e-300 for s in S_ref[k:])  # nothing left out
    rank = spec.numerical_rank
    if rank:
        U, V = spec.U.double()[:, :rank], spec.V.double()[:, :rank]
        torch.testing.assert_close((U * spec.S[:rank]) @ V.T, oracle, rtol=0, atol=50 * rtol * top)
        torch.testing.assert_close(U.T @ U, torch.eye(rank, dtype=torch.float64), rtol=0, atol=50 * rtol)


shapes = st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 5))


@SETTINGS
@given(shape=shapes, deficient=st.booleans(), dtype=st.sampled_from(DTYPES), kernel=st.sampled_from([None, (1, 1), (3, 3), (1, 3)]),
       alpha=st.floats(0.01, 100), seed=st.integers(0, 10**6))
def test_lora_any_shape_rank_kernel_dtype(shape, deficient, dtype, kernel, alpha, seed):
    d_out, c_in, r = shape
    g = torch.Generator().manual_seed(seed)
    d_in = c_in * (math.prod(kernel) if kernel else 1)
    B = rand(g, d_out, r, dtype=dtype, rank=max(1, r // 2) if deficient else None)
    A = rand(g, r, d_in, dtype=dtype)
    m = LoraModule(A=A, B=B, alpha=alpha, kernel=kernel)
    check_spectrum(m, alpha / r * (B.double() @ A.double()), dtype)
    assert m.delta_weight(torch.float64).shape == ((d_out, c_in, *kernel) if kernel else (d_out, d_in))


@SETTINGS
@given(shape=shapes, pruned=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_adalora(shape, pruned, seed):
    d_out, d_in, r = shape
    g = torch.Generator().manual_seed(seed)
    A, B, E = rand(g, r, d_in), rand(g, d_out, r), rand(g, r)
    E[: min(pruned, r)] = 0.0  # pruned singular values left in the file
    m = AdaLoraModule(A=A, B=B, alpha=4.0, E=E, ranknum=6.0)
    check_spectrum(m, 4.0 / (6.0 + 1e-5) * B @ (A * E[:, None]), torch.float64)


def test_adalora_rank_zero_is_an_empty_spectrum():
    m = AdaLoraModule(A=torch.zeros(0, 7), B=torch.zeros(5, 0), alpha=4.0, E=torch.zeros(0), ranknum=0.0)
    spec = module_spectrum(m, device="cpu")
    assert spec.S.numel() == 0 and spec.numerical_rank == 0 and spec.metrics().frobenius == 0.0


@SETTINGS
@given(c_out=st.integers(1, 8), c_in=st.integers(1, 5), r=st.integers(1, 4), kernel=st.sampled_from([(3, 3), (1, 3), (5,)]),
       dtype=st.sampled_from(DTYPES[:2]), seed=st.integers(0, 10**6))
def test_tucker(c_out, c_in, r, kernel, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    up, mid, down = rand(g, c_out, r, dtype=dtype), rand(g, r, r, *kernel, dtype=dtype), rand(g, r, c_in, dtype=dtype)
    m = TuckerModule(alpha=3.0, divisor=float(r), up=up, mid=mid, down=down, kernel=kernel)
    oracle = 3.0 / r * torch.einsum("oa,ab...,bc->oc...", up.double(), mid.double(), down.double()).reshape(c_out, -1)
    check_spectrum(m, oracle, dtype)
    assert m.delta_weight(torch.float64).shape == (c_out, c_in, *kernel)


@SETTINGS
@given(shape=shapes, r2=st.integers(1, 4), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 10**6))
def test_loha_khatri_rao(shape, r2, dtype, seed):
    d_out, d_in, r1 = shape
    g = torch.Generator().manual_seed(seed)
    X, Y, P, Q = rand(g, d_out, r1, dtype=dtype), rand(g, r1, d_in, dtype=dtype), rand(g, d_out, r2, dtype=dtype), rand(g, r2, d_in, dtype=dtype)
    m = LohaModule(alpha=2.0, divisor=float(r1), w1_a=X, w1_b=Y, w2_a=P, w2_b=Q)
    oracle = 2.0 / r1 * (X.double() @ Y.double()) * (P.double() @ Q.double())
    check_spectrum(m, oracle, dtype)


def factor(g, m, n, factored: bool, r: int, dtype) -> KroneckerFactor:
    return KroneckerFactor(a=rand(g, m, r, dtype=dtype), b=rand(g, r, n, dtype=dtype)) if factored else KroneckerFactor(full=rand(g, m, n, dtype=dtype))


@SETTINGS
@given(sizes=st.tuples(*[st.integers(1, 5)] * 4), factored=st.tuples(st.booleans(), st.booleans()), r=st.integers(1, 3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 10**6))
def test_lokr_kronecker(sizes, factored, r, dtype, seed):
    a, c, b, d = sizes
    g = torch.Generator().manual_seed(seed)
    w1, w2 = factor(g, a, c, factored[0], r, dtype), factor(g, b, d, factored[1], r, dtype)
    m = LokrModule(alpha=5.0, divisor=float(r), w1=w1, w2=w2)

    def dense(w: KroneckerFactor) -> torch.Tensor:
        return w.full.double() if w.full is not None else w.a.double() @ w.b.double()

    check_spectrum(m, 5.0 / r * torch.kron(dense(w1), dense(w2)), dtype)


def test_lokr_singular_vectors_are_kronecker_products():
    g = torch.Generator().manual_seed(0)
    w1, w2 = rand(g, 3, 4), rand(g, 5, 2)
    spec = module_spectrum(LokrModule(alpha=None, divisor=1.0, w1=KroneckerFactor(full=w1), w2=KroneckerFactor(full=w2),
                                      alpha_ignored=True), device="cpu")
    U1, S1, _ = torch.linalg.svd(w1, full_matrices=False)
    U2, S2, _ = torch.linalg.svd(w2, full_matrices=False)
    torch.testing.assert_close(spec.S, torch.kron(S1, S2).sort(descending=True).values)
    assert spec.S.numel() == 6 and not spec.has_factor_bases
    top = torch.kron(U1[:, 0], U2[:, 0])
    assert abs(float(spec.U[:, 0] @ top)) == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(shape=shapes, on_output=st.booleans(), kernel=st.sampled_from([None, (3, 3)]), seed=st.integers(0, 10**6))
def test_dora_with_base(shape, on_output, kernel, seed):
    d_out, c_in, r = shape
    g = torch.Generator().manual_seed(seed)
    d_in = c_in * (9 if kernel else 1)
    A, B, W0 = rand(g, r, d_in), rand(g, d_out, r), rand(g, d_out, d_in)
    m_size = d_out if on_output else c_in
    magnitude = rand(g, m_size).abs() + 0.5
    m = DoraModule(LoraModule(A=A, B=B, alpha=2.0, kernel=kernel), magnitude, norm_on_output=on_output, epsilon=1e-7)
    V = W0 + 2.0 / r * B @ A
    if on_output:
        oracle = magnitude[:, None] / (V.norm(dim=1, keepdim=True) + 1e-7) * V - W0
    else:
        grouped = V.reshape(d_out, c_in, -1)
        oracle = (grouped * (magnitude / (grouped.norm(dim=(0, 2)) + 1e-7))[None, :, None]).reshape(d_out, d_in) - W0
    check_spectrum(m, oracle, torch.float64, base=W0)
    direction = module_spectrum(m.direction(), device="cpu", dtype=torch.float64)
    torch.testing.assert_close(direction.S, torch.linalg.svdvals(2.0 / r * B @ A)[: direction.S.numel()])
    assert direction.kind == "dora-direction"


def test_dora_without_base_is_refused():
    m = DoraModule(LoraModule(A=torch.ones(2, 3), B=torch.ones(4, 2), alpha=2.0), torch.ones(4))
    with pytest.raises(LoraAnalysisError, match="needs the base") as info:
        module_spectrum(m, device="cpu")
    assert "\n" not in str(info.value)


@SETTINGS
@given(shape=shapes, experts=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_dense_and_fused_experts(shape, experts, seed):
    d_out, d_in, r = shape
    g = torch.Generator().manual_seed(seed)
    delta = rand(g, d_out, d_in)
    check_spectrum(DenseModule(alpha=3.0, divisor=2.0, delta=delta), 1.5 * delta, torch.float64)
    modules = [LoraModule(A=rand(g, r, d_in), B=rand(g, d_out, r), alpha=2.0) for _ in range(experts)]
    oracle = torch.block_diag(*(2.0 / r * m.B @ m.A for m in modules))
    check_spectrum(ExpertsModule(modules), oracle, torch.float64)


def test_factor_bases_exist_only_for_kinds_with_factors():
    g = torch.Generator().manual_seed(1)
    lora = module_spectrum(LoraModule(A=rand(g, 3, 8), B=rand(g, 8, 3), alpha=3.0), device="cpu")
    loha = module_spectrum(LohaModule(alpha=1.0, divisor=2.0, w1_a=rand(g, 8, 2), w1_b=rand(g, 2, 8),
                                      w2_a=rand(g, 8, 2), w2_b=rand(g, 2, 8)), device="cpu")
    assert lora.has_factor_bases and not loha.has_factor_bases
    with pytest.raises(LoraAnalysisError, match="use dW-right") as info:
        compare_modules(lora, loha, basis="A")
    assert "loha" in str(info.value) and "\n" not in str(info.value)
    labelled = compare_modules(lora, loha, basis="A", fallback=True)
    assert labelled.basis == "dW-right"
    assert compare_modules(lora, lora, basis="A", fallback=True).basis == "A"


# ---------------------------------------------------------------------------- the whole float range


@settings(max_examples=40, deadline=None)
@given(k=st.integers(-1000, 1000), seed=st.integers(0, 10**6))
def test_powers_of_two_scale_singular_values_exactly(k, seed):
    """B·2**k gives S·2**k bit for bit, and the same ranks: normalization removes the power."""
    g = torch.Generator().manual_seed(seed)
    A, B = rand(g, 3, 9), rand(g, 7, 3, rank=2)
    plain = module_spectrum(LoraModule(A=A, B=B, alpha=3.0), device="cpu", dtype=torch.float64)
    scaled_B = torch.ldexp(B, torch.tensor(k, dtype=torch.float64))
    if not torch.isfinite(scaled_B).all() or float(scaled_B.abs().min()) < torch.finfo(torch.float64).tiny:
        return  # the factor itself leaves float64's normal range: nothing to compare
    expected = torch.ldexp(plain.S, torch.tensor(k, dtype=torch.float64))
    if float(expected[plain.numerical_rank - 1]) < torch.finfo(torch.float64).tiny or not torch.isfinite(expected).all():
        with pytest.raises(LoraAnalysisError, match="float64"):
            module_spectrum(LoraModule(A=A, B=scaled_B, alpha=3.0), device="cpu", dtype=torch.float64)
        return
    scaled = module_spectrum(LoraModule(A=A, B=scaled_B, alpha=3.0), device="cpu", dtype=torch.float64)
    assert torch.equal(scaled.S[: plain.numerical_rank], expected[: plain.numerical_rank])
    assert scaled.numerical_rank == plain.numerical_rank == 2
    m0, m1 = plain.metrics(), scaled.metrics()
    assert (m1.stable_rank, m1.energy_rank, m1.roy_vetterli_rank) == (m0.stable_rank, m0.energy_rank, m0.roy_vetterli_rank)
    assert m1.frobenius == pytest.approx(math.ldexp(m0.frobenius, k), rel=1e-15)


@pytest.mark.parametrize("alpha", [1e-170, 1e-300, 1e150])
def test_tiny_and_huge_alpha_keep_every_metric(alpha):
    g = torch.Generator().manual_seed(2)
    A, B = rand(g, 4, 12), rand(g, 10, 4)
    one = module_spectrum(LoraModule(A=A, B=B, alpha=4.0), device="cpu", dtype=torch.float64)
    spec = module_spectrum(LoraModule(A=A, B=B, alpha=4.0 * alpha), device="cpu", dtype=torch.float64)
    metrics, reference = spec.metrics(), one.metrics()
    assert metrics.frobenius == pytest.approx(reference.frobenius * alpha, rel=1e-13) and metrics.frobenius > 0
    assert metrics.sigma_max == pytest.approx(reference.sigma_max * alpha, rel=1e-13)
    assert metrics.stable_rank == pytest.approx(reference.stable_rank, rel=1e-13)
    assert metrics.numerical_rank == reference.numerical_rank == 4
    assert math.isfinite(metrics.roy_vetterli_rank) and metrics.energy_rank == reference.energy_rank


def test_denormal_float32_factors_keep_their_rank():
    """A rank-2 factor of small integers times 2**-140 is exactly representable, and denormal,
    in float32: its rank and spectrum must come out as for the same factor times 1."""
    g = torch.Generator().manual_seed(3)
    integers = torch.randint(-4, 5, (16, 2), generator=g).double() @ torch.randint(-4, 5, (2, 3), generator=g).double()
    B = (integers * 2.0**-140).to(torch.float32)
    assert float(B.abs().max()) < torch.finfo(torch.float32).tiny and torch.equal(B.double(), integers * 2.0**-140)
    A = rand(g, 3, 16, dtype=torch.float32)
    spec = module_spectrum(LoraModule(A=A, B=B, alpha=3.0), device="cpu")
    plain = module_spectrum(LoraModule(A=A, B=integers.float(), alpha=3.0), device="cpu")
    assert spec.numerical_rank == plain.numerical_rank == 2
    assert torch.equal(spec.S, torch.ldexp(plain.S, torch.tensor(-140, dtype=torch.float64)))
    torch.testing.assert_close(spec.S[:2], torch.linalg.svdvals(B.double() @ A.double())[:2], rtol=1e-5, atol=0)


def test_unrepresentable_results_are_refused_in_one_line():
    g = torch.Generator().manual_seed(4)
    A, B = rand(g, 2, 5), rand(g, 5, 2)
    with pytest.raises(LoraAnalysisError, match="overflows float64") as info:
        module_spectrum(LoraModule(A=A * 1e200, B=B * 1e200, alpha=2.0), device="cpu", dtype=torch.float64)
    assert "\n" not in str(info.value)
    with pytest.raises(LoraAnalysisError, match="normal range"):
        module_spectrum(LoraModule(A=A * 1e-160, B=B * 1e-160, alpha=2.0), device="cpu", dtype=torch.float64)


def test_analysis_can_release_vectors_and_still_report():
    from lora_analysis import Adapter
    from lora_analysis.analysis import AnalysisOptions, analyze_adapter
    from lora_analysis.report import analyze_report, render_report

    g = torch.Generator().manual_seed(5)
    adapter = Adapter({"l.0.q": LoraModule(A=rand(g, 3, 8), B=rand(g, 8, 3), alpha=3.0)})
    kept = analyze_adapter(adapter, progress=False)
    light = analyze_adapter(adapter, options=AnalysisOptions(keep_vectors=False), progress=False)
    assert torch.equal(kept["l.0.q"].spectrum.S, light["l.0.q"].spectrum.S)
    with pytest.raises(LoraAnalysisError, match="released"):
        light["l.0.q"].spectrum.U
    assert render_report(analyze_report(light, adapter), "json") == render_report(analyze_report(kept, adapter), "json")
