"""Randomized vs exact SVD of one dense ΔW per shape: where the randomized route starts to pay
(the `SvdOptions.min_dim` threshold of `--svd auto`).

    OMP_NUM_THREADS=2 python benchmarks/bench_dense_svd.py

ΔW = U diag(σ) Vᵀ (rank 32, σ from 1 to 0.1) + Gaussian noise of total ‖·‖_F ≈ 1e-5·√(m·n)^½,
normalized to a largest entry of order 1, float64. Randomized: `dense_svd(M, "randomized")`
(sketch, power iterations, float64 pass, residual, SVD of B, U = Q·U_B). Exact: LAPACK's
singular values alone (`torch.linalg.svdvals`), a lower bound of the exact route's cost (which
also forms U and V). One run each, wall time.
"""

from __future__ import annotations

import time

import torch

from lora_analysis.analysis import SvdOptions, dense_svd

SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (11008, 4096)]


def main() -> None:
    torch.manual_seed(0)
    print("| shape | randomized | sketch l | ‖E‖_F/‖ΔW‖_F | exact singular values |\n|---|---|---|---|---|")
    for m, n in SHAPES:
        U = torch.linalg.qr(torch.randn(m, 32, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, 32, dtype=torch.float64)).Q
        M = U @ torch.diag(torch.logspace(0, -1, 32, dtype=torch.float64)) @ V.T + 1e-5 * torch.randn(m, n, dtype=torch.float64) / (m * n) ** 0.25
        M /= M.abs().max()
        start = time.perf_counter()
        result = dense_svd(M, SvdOptions(method="randomized"))
        randomized = time.perf_counter() - start
        start = time.perf_counter()
        torch.linalg.svdvals(M)
        exact = time.perf_counter() - start
        print(f"| {m} × {n} | {randomized:.2f} s | {result.sketch} | {result.residual / result.frobenius:.2e} | {exact:.2f} s |",
              flush=True)


if __name__ == "__main__":
    main()
