"""Normalized subspace similarity φ (Hu et al. 2021, Eq. 4) between adapters, modules and layers.

    φ(U₁, U₂, i, j) = ‖U₁⁽ⁱ⁾ᵀ U₂⁽ʲ⁾‖²_F / min(i, j) ∈ [0, 1]

with U⁽ⁱ⁾ the top-i singular vectors. All (i, j) at once from one product M = U₁ᵀU₂ and 2-D
cumulative sums of M ∘ M. Grids are 0-based: grid[i - 1, j - 1] = φ(i, j); entries beyond
either numerical rank are NaN (those directions are arbitrary).

Chance level: for independent uniformly random subspaces of dims i, j in Rᵈ,
E‖U_iᵀU_j‖²_F = ij/d, so E[φ(i, j)] = max(i, j)/d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..adapters import Adapter
from ..config import BasisKind
from ..errors import LoraAnalysisError, shown
from ..naming import layer_of, layer_pattern, strip_known_prefixes
from ..seeding import random_basis, seeded_generator
from .spectrum import Basis, ModuleSpectrum, adapter_spectra

Spectra = Mapping[str, ModuleSpectrum]


def subspace_similarity(
    U1: torch.Tensor | np.ndarray,
    U2: torch.Tensor | np.ndarray,
    rank1: int | None = None,
    rank2: int | None = None,
) -> np.ndarray:
    """φ grid of two orthonormal bases U1: (d, k1), U2: (d, k2) → (k1, k2) float64.

    grid[i-1, j-1] = φ(i, j); NaN where i > rank1 or j > rank2 (ranks default to k1, k2).
    """
    U1, U2 = _as_tensor(U1), _as_tensor(U2)
    if U1.ndim != 2 or U2.ndim != 2 or U1.shape[0] != U2.shape[0]:
        raise LoraAnalysisError(f"φ needs bases (d, k1) and (d, k2) of one space, got {tuple(U1.shape)} and {tuple(U2.shape)}")
    return phi_grid(_cross_product(U1, U2), rank1, rank2)


def phi_grid(M: np.ndarray, rank1: int | None = None, rank2: int | None = None) -> np.ndarray:
    """φ grid from the cross product M = U1ᵀU2: (k1, k2) (see `subspace_similarity`); a stack
    (..., k1, k2) of cross products gives a stack of grids."""
    k1, k2 = M.shape[-2:]
    cumulative = np.cumsum(np.cumsum(M * M, axis=-2), axis=-1)
    i, j = np.arange(1, k1 + 1)[:, None], np.arange(1, k2 + 1)[None, :]
    grid = np.clip(cumulative / np.minimum(i, j), 0.0, 1.0)
    grid[..., (i > _rank(rank1, k1)) | (j > _rank(rank2, k2))] = np.nan
    return grid


def _cross_product(U1: torch.Tensor, U2: torch.Tensor) -> np.ndarray:
    """U1ᵀU2 in float64 (the d-sized product in the inputs' common dtype, at least float32)."""
    dtype = torch.promote_types(torch.promote_types(U1.dtype, U2.dtype), torch.float32)
    return (U1.to(dtype).T @ U2.to(device=U1.device, dtype=dtype)).double().cpu().numpy()


def principal_angles(U1: torch.Tensor | np.ndarray, U2: torch.Tensor | np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between span(U1) and span(U2), orthonormal columns."""
    return _angles(_cross_product(_as_tensor(U1), _as_tensor(U2)))


def _angles(M: np.ndarray) -> np.ndarray:
    """arccos of the singular values of the cross product M = U1ᵀU2."""
    if 0 in M.shape:
        return np.zeros(0)
    return np.arccos(np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0))


def chance_level(k1: int, k2: int, d: int) -> np.ndarray:
    """Expected φ(i, j) of independent uniformly random subspaces in Rᵈ: (k1, k2), max(i, j)/d."""
    i, j = np.arange(1, k1 + 1)[:, None], np.arange(1, k2 + 1)[None, :]
    return np.maximum(i, j) / d


def random_reference_grid(d: int, k1: int, k2: int, seed: int = 0) -> np.ndarray:
    """φ grid of two independent random subspaces of Rᵈ (paper Fig. 4, third panel): (k1, k2)."""
    generator = seeded_generator(seed)
    return subspace_similarity(random_basis(d, k1, generator), random_basis(d, k2, generator))


@dataclass
class Comparison:
    """φ between two modules' bases of one space (dim d).

    grid: (k_a, k_b), grid[i-1, j-1] = φ(i, j), NaN beyond the numerical ranks.
    phi_11 = φ(1, 1); top_k_mean = mean of φ(i, i) for i ≤ top_k (top_k ≤ both ranks);
    principal_angles: radians, ascending, between the rank-truncated subspaces.
    """

    grid: np.ndarray
    basis: BasisKind
    dim: int
    rank_a: int
    rank_b: int
    phi_11: float
    top_k: int
    top_k_mean: float
    principal_angles: np.ndarray

    @property
    def chance(self) -> np.ndarray:
        """Chance level max(i, j)/d, same shape as `grid`."""
        return chance_level(self.grid.shape[0], self.grid.shape[1], self.dim)

    def phi(self, i: int, j: int) -> float:
        """φ(i, j), 1-based."""
        return float(self.grid[i - 1, j - 1])


def compare_bases(a: Basis, b: Basis, top_k: int | None = None) -> Comparison:
    """`Comparison` of two bases of the same space.

    M = aᵀb = rotation_aᵀ (frame_aᵀ frame_b) rotation_b: one d × k × k product, the rest small
    (a rotation of None is the identity).
    """
    if a.dim != b.dim:
        raise LoraAnalysisError(f"its {a.kind} bases live in spaces of different dimensions, {a.dim} and {b.dim}, "
                                "so φ between them does not exist")
    product = torch.from_numpy(_cross_product(a.frame, b.frame))
    if a.rotation is not None:
        product = a.rotation.cpu().T @ product
    if b.rotation is not None:
        product = product @ b.rotation.cpu()
    M = product.numpy()
    grid = phi_grid(M, a.rank, b.rank)
    k = min(a.rank, b.rank) if top_k is None else min(top_k, a.rank, b.rank)
    return Comparison(
        grid=grid,
        basis=a.kind,
        dim=a.dim,
        rank_a=a.rank,
        rank_b=b.rank,
        phi_11=float(grid[0, 0]) if k else float("nan"),
        top_k=k,
        top_k_mean=float(np.diagonal(grid)[:k].mean()) if k else float("nan"),
        principal_angles=_angles(M[: a.rank, : b.rank]),
    )


def compare_modules(a: ModuleSpectrum, b: ModuleSpectrum, basis: BasisKind = "A", top_k: int | None = None,
                    fallback: bool = False) -> Comparison:
    """φ between two modules' spectra in the chosen basis (default: right-singular vectors of A).

    The bases "A" and "B" exist only for updates with such factors (`has_factor_bases`: LoRA,
    AdaLoRA, Tucker); for others (LoHa, LoKr, DoRA, dense) asking for them raises, unless
    `fallback`: then the pair is compared in ΔW's own singular vectors of the same space
    (A → dW-right, the input space; B → dW-left), and `Comparison.basis` says so.
    """
    return compare_bases(a.basis(pair_basis(a, b, basis, fallback)), b.basis(pair_basis(a, b, basis, fallback)), top_k)


def pair_basis(a: ModuleSpectrum, b: ModuleSpectrum, basis: BasisKind, fallback: bool) -> BasisKind:
    """The basis two modules are compared in: `basis`, or with `fallback` ΔW's singular vectors
    of the same space where "A"/"B" do not exist for one of them (see `compare_modules`)."""
    if fallback and basis in ("A", "B") and not (a.has_factor_bases and b.has_factor_bases):
        return "dW-right" if basis == "A" else "dW-left"
    return basis


@dataclass
class AdapterComparison:
    """Module-by-module φ of two adapters (ranks, seeds, checkpoints).

    modules: keyed by adapter a's module names, in a's order; matched: a-name → b-name
    (names matched after stripping wrapper prefixes such as `base_model.model.`).
    """

    modules: dict[str, Comparison]
    matched: dict[str, str]
    only_in_a: list[str]
    only_in_b: list[str]
    basis: BasisKind


def compare_adapters(
    a: Adapter | Spectra,
    b: Adapter | Spectra,
    basis: BasisKind = "A",
    top_k: int | None = None,
    progress: bool = False,
    sources: tuple[str | None, str | None] | None = None,
    fallback: bool = False,
) -> AdapterComparison:
    """φ of every module present in both adapters; lists the modules present in only one.

    sources: the two adapters' files, named in errors (default: an Adapter's `source`).
    Raises `LoraAnalysisError` naming both files when a module's two bases live in spaces of
    different dimensions, and naming the file when one adapter names a module twice.
    `fallback`: pairs of kinds without factors A/B are compared in ΔW's singular vectors of
    the same space, each pair's `basis` saying which (see `compare_modules`); else they raise.
    """
    label_a, label_b = sources or (_source(a), _source(b))
    spectra_a, spectra_b = _spectra(a, progress), _spectra(b, progress)
    matched = match_module_names(list(spectra_a), list(spectra_b), (label_a or "adapter A", label_b or "adapter B"))
    comparisons = {}
    for name_a, name_b in matched.items():
        try:
            comparisons[name_a] = compare_modules(spectra_a[name_a], spectra_b[name_b], basis, top_k, fallback)
        except LoraAnalysisError as e:
            where = f"{shown(label_a)} and {shown(label_b)}: " if label_a and label_b else ""
            raise LoraAnalysisError(f"{where}module {shown(name_a)}: {e}") from None
    return AdapterComparison(
        modules=comparisons,
        matched=matched,
        only_in_a=[n for n in spectra_a if n not in matched],
        only_in_b=[n for n in spectra_b if n not in set(matched.values())],
        basis=basis,
    )


def match_module_names(names_a: list[str], names_b: list[str],
                       labels: tuple[str, str] = ("adapter A", "adapter B")) -> dict[str, str]:
    """a-name → b-name for modules named alike in both, exact or after stripping known prefixes.

    Raises `LoraAnalysisError` (naming that side's label) when either side names one module
    twice (`base_model.model.m` and `m`): which of the two to compare would be a guess.
    """
    _module_keys(names_a, labels[0])
    keys_b = _module_keys(names_b, labels[1])
    set_b = set(names_b)
    matched = {}
    for name in names_a:
        if name in set_b:
            matched[name] = name
        elif strip_known_prefixes(name) in keys_b:
            matched[name] = keys_b[strip_known_prefixes(name)]
    return matched


def _module_keys(names: list[str], label: str) -> dict[str, str]:
    """{name without known prefixes: name}; two names of one module are an error naming `label`."""
    owners: dict[str, str] = {}
    for name in names:
        key = strip_known_prefixes(name)
        if key in owners:
            raise LoraAnalysisError(f"{shown(label)}: modules {shown(owners[key])} and {shown(name)} name the same module")
        owners[key] = name
    return owners


def _source(x: Adapter | Spectra) -> str | None:
    return x.source if isinstance(x, Adapter) else None


@dataclass
class LayerComparison:
    """φ summaries between the layers of one module type inside one adapter.

    module_type: the module name with its layer index replaced by `*`; layers: (L,) indices;
    names: (L,) module names; phi_11, top_k_mean: (L, L) matrices, entry [a, b] compares
    layers[a] with layers[b] (diagonal 1 where the rank is ≥ 1).
    """

    module_type: str
    layers: list[int]
    names: list[str]
    phi_11: np.ndarray
    top_k_mean: np.ndarray
    basis: BasisKind


def compare_layers(
    adapter: Adapter | Spectra, basis: BasisKind = "A", top_k: int | None = None, progress: bool = False
) -> dict[str, LayerComparison]:
    """Layer-vs-layer φ inside one adapter, per module type (e.g. `encoder.layer.*.attention.self.query`).

    Layer and module type come from `naming.layer_of` / `naming.layer_pattern` (the first
    integer component of the path, so MoE experts and T5 sub-layers stay apart); module types
    present in a single layer are skipped.
    """
    spectra = _spectra(adapter, progress)
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in spectra:
        layer, module_type = layer_of(name), layer_pattern(name)
        if layer is not None and module_type is not None:
            groups.setdefault(module_type, []).append((layer[1], name))
    result = {}
    for module_type, members in groups.items():
        if len(members) < 2:
            continue
        members.sort()
        bases = [spectra[name].basis(basis) for _, name in members]
        n = len(members)
        phi_11, top_k_mean = np.full((n, n), np.nan), np.full((n, n), np.nan)
        for x in range(n):
            for y in range(x, n):
                c = compare_bases(bases[x], bases[y], top_k)
                phi_11[x, y] = phi_11[y, x] = c.phi_11
                top_k_mean[x, y] = top_k_mean[y, x] = c.top_k_mean
        result[module_type] = LayerComparison(
            module_type, [layer for layer, _ in members], [name for _, name in members], phi_11, top_k_mean, basis
        )
    return result


def _spectra(x: Adapter | Spectra, progress: bool) -> Spectra:
    # exact: φ needs ΔW's singular vectors, which a randomized SVD's bound does not cover
    return adapter_spectra(x, progress=progress, svd="exact") if isinstance(x, Adapter) else x


def _rank(rank: int | None, k: int) -> int:
    return k if rank is None else rank


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
