"""Each module's update ΔW as a small typed object whose one job is an exact factored form of ΔW.

Every update states its shape in the `nn.Linear` orientation, ΔW: (d_out, d_in) — a conv
kernel flattened per output channel, d_in = c_in·kh·kw — how that maps onto the base weight's
storage (`Storage`: transposed for GPT-2 Conv1D and embeddings, a conv kernel, fused experts),
its parameter count, α and the scale s (α unknown stays unknown: `alpha_known` is False and
the analysis says so; s = 1 is then only a stand-in), and `factored(dtype)`: ΔW as one of four
exact forms the analysis knows how to take apart without forming d_out × d_in matrices:

    LowRankForm          ΔW = s · B diag(e) A            B: (d_out, k), A: (k, d_in)
    KroneckerForm        ΔW = s · (L ⊗ R)                L, R: low-rank or dense forms
    BlockDiagonalForm    ΔW = diag(ΔW_1, …, ΔW_E)        fused expert parameters
    DenseForm            ΔW = s · M                      M: (d_out, d_in), formed (the exception)

Kinds (`UpdateKind`) and their forms, with the math in each class:

    lora      s·B·A (PEFT, kohya, LoCon, loralib, torchtune, LitGPT, AdapterHub, diffusers)
    adalora   (α / (ranknum + 1e-5)) · B diag(E) A                    → LowRankForm
    tucker    ΔW_flat = s · up · M, M = mid ×₂ down                    → LowRankForm
    loha      s · (X Y) ∘ (P Q) = s · (X ⊙ P)(Y ⊙ Q)                   → LowRankForm (Khatri–Rao)
    lokr      s · (w1 ⊗ w2)                                            → KroneckerForm
    dora      diag(m / ‖W₀ + ΔW_dir‖) (W₀ + ΔW_dir) − W₀, needs W₀     → DenseForm
    dense     a materialized ΔW (loralib Conv2d's reshaped B·A)        → DenseForm

Exact over the whole float range: s travels as a `Scale` (a float64 mantissa and an integer
exponent). The analysis scales every tensor of a form by an exact power of two (`normalized`)
so that its largest entry lies in [0.5, 1) and adds the exponent to the scale; kinds whose
forms hold products of the file's tensors (Tucker's M, LoHa's Khatri–Rao factors) normalize
the tensors before multiplying them. So neither α = 1e-170 nor denormal factors lose a bit
before the analysis multiplies the scale back in, on σ/σ₁ where it can.

`delta_weight()` materializes ΔW in the base weight's storage shape, for tests on small sizes.
Nothing here knows `torch.nn` models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union

import numpy as np
import torch

from ..config import effective_alpha, lora_scale
from ..errors import LoraAnalysisError

UpdateKind = Literal["lora", "adalora", "tucker", "loha", "lokr", "dora", "dora-direction", "dense"]
ADALORA_EPSILON = 1e-5  # PEFT's AdaLoRA scale α / (ranknum + 1e-5)


# ---------------------------------------------------------------------------- scales and forms


@dataclass(frozen=True)
class Scale:
    """value · 2**exponent: a scale factor kept exact beyond the float64 range (value float64)."""

    value: float
    exponent: int = 0

    def times(self, other: "Scale | float", exponent: int = 0) -> "Scale":
        """This scale times `other` times 2**exponent, renormalized (value in [0.5, 1) or 0)."""
        if not isinstance(other, Scale):
            other = Scale(float(other))
        mantissa, shift = math.frexp(self.value * other.value) if self.value and other.value else (0.0, 0)
        return Scale(mantissa, self.exponent + other.exponent + exponent + shift)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """values · value · 2**exponent in float64, rounded once (C `ldexp`): inf or 0 (or
        denormal) where the result leaves float64's range."""
        with np.errstate(over="ignore", under="ignore"):
            scaled = np.ldexp(values.detach().double().cpu().numpy() * self.value, self.exponent)
        return torch.from_numpy(np.asarray(scaled, dtype=np.float64)).to(values.device)


def peak_exponent(tensor: torch.Tensor) -> int:
    """e with max |tensor| = m·2**e, m ∈ [0.5, 1); 0 for zero, empty or non-finite tensors."""
    if not tensor.numel():
        return 0
    low, high = torch.aminmax(tensor)  # one pass, no |tensor| copy (vector_norm(inf) is 60× slower)
    peak = max(-float(low), float(high))
    return math.frexp(peak)[1] if peak and math.isfinite(peak) else 0


def normalized(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(tensor · 2**-e in `dtype`, e) with e = `peak_exponent(tensor)`, so the largest entry lies
    in [0.5, 1). Scaling by a power of two is exact: denormal or huge entries keep every bit
    they had (in the wider of their dtype and `dtype`)."""
    exponent = peak_exponent(tensor)
    wide = tensor.to(torch.promote_types(tensor.dtype, dtype), copy=True)
    return times_power_of_two_(wide, -exponent).to(dtype), exponent


def times_power_of_two_(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    """tensor · 2**exponent in place, exact (no rounding unless entries leave the dtype's range):
    in steps small enough that no power of two overflows the dtype (2**138 does in float32)."""
    step = math.frexp(torch.finfo(tensor.dtype).max)[1] - 2
    while exponent:
        k = max(-step, min(step, exponent))
        tensor.mul_(2.0 ** k)
        exponent -= k
    return tensor


@dataclass(frozen=True)
class LowRankForm:
    """ΔW = scale · B diag(e) A, B: (d_out, k), A: (k, d_in), e: (k,) or None (= ones).

    Tensors in any float dtype, not yet normalized (the analysis does it, in its own buffers).
    `factor_bases`: B and A are the update's own trained factors (LoRA, AdaLoRA, Tucker's up and
    M), so the paper's bases "A" (right-singular vectors of A) and "B" (left-singular vectors of
    B) mean something.
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: Scale
    e: torch.Tensor | None = None
    factor_bases: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])


@dataclass(frozen=True)
class DenseForm:
    """ΔW = scale · M, M: (d_out, d_in): exact SVD of a formed matrix."""

    M: torch.Tensor
    scale: Scale

    @property
    def shape(self) -> tuple[int, int]:
        return (self.M.shape[0], self.M.shape[1])


@dataclass(frozen=True)
class KroneckerForm:
    """ΔW = scale · (left ⊗ right), left: (m1, n1), right: (m2, n2) → (m1·m2, n1·n2).

    σ(L ⊗ R) = {σᵢ(L)·σⱼ(R)} with singular vectors uᵢ ⊗ u'ⱼ and vᵢ ⊗ v'ⱼ: exact from the two
    small factors' SVDs, never forming ΔW.
    """

    left: "LowRankForm | DenseForm"
    right: "LowRankForm | DenseForm"
    scale: Scale

    @property
    def shape(self) -> tuple[int, int]:
        (m1, n1), (m2, n2) = self.left.shape, self.right.shape
        return (m1 * m2, n1 * n2)


@dataclass(frozen=True)
class BlockDiagonalForm:
    """ΔW = diag(ΔW_1, …, ΔW_E): a fused expert parameter (E, d_out, d_in) as one operator.

    Its singular values are the union of the blocks', its singular vectors the blocks' placed
    in their rows / columns."""

    blocks: tuple["LowRankForm | DenseForm", ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(b.shape[0] for b in self.blocks), sum(b.shape[1] for b in self.blocks))


Form = Union[LowRankForm, DenseForm, KroneckerForm, BlockDiagonalForm]


# ---------------------------------------------------------------------------- storage and info


@dataclass(frozen=True)
class Storage:
    """How ΔW in the Linear orientation (d_out, d_in) maps onto the base weight as stored.

    transposed: W is stored (d_in, d_out) (GPT-2 Conv1D / fan_in_fan_out, nn.Embedding's
        (num_embeddings, dim)); None when the file does not say (loralib).
    kernel: W is a conv kernel (c_out, c_in, *kernel) and d_in = c_in·∏kernel; None for 2-D
        weights and where the factors do not record the kernel (PEFT LoHa/LoKr keep it flat).
    experts: W is a fused expert parameter (E, d_out/E, d_in/E), ΔW its block-diagonal operator.
    weight_suffix: where the tool's wrapper keeps W when it is not the module's own `weight`:
        `<module>.<suffix>.weight` (loralib's Conv2d: "conv"; LitGPT: "linear").
    """

    transposed: bool | None = False
    kernel: tuple[int, ...] | None = None
    experts: int | None = None
    weight_suffix: str | None = None

    def stored(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW (d_out, d_in) in the storage shape."""
        if self.experts:
            E = self.experts
            rows, cols = delta.shape[0] // E, delta.shape[1] // E
            return torch.stack([delta[e * rows:(e + 1) * rows, e * cols:(e + 1) * cols] for e in range(E)])
        if self.kernel:
            return delta.reshape(delta.shape[0], -1, *self.kernel)
        return delta.T if self.transposed else delta

    def describe(self) -> str:
        if self.experts:
            return f"{self.experts} fused experts"
        if self.kernel:
            return "conv " + "×".join(map(str, self.kernel))
        return {True: "transposed", False: "", None: "orientation not recorded"}[self.transposed]


@dataclass(frozen=True)
class UpdateInfo:
    """What reports say about an update, without its tensors.

    shape: (d_out, d_in), Linear orientation, conv flattened; r: the rank the tool defines
    (None where the file has none, e.g. LoKr with two full factors); alpha: as recorded (None:
    unknown); scale: s (None when α is unknown); parameters: numbers in the file's factors;
    notes: how the update was read where the file leaves something open.
    """

    kind: UpdateKind
    shape: tuple[int, int]
    r: int | None
    alpha: float | None
    scale: float | None
    parameters: int
    storage: Storage
    component: str | None = None
    use_rslora: bool = False
    notes: tuple[str, ...] = ()

    @property
    def alpha_known(self) -> bool:
        return self.scale is not None


# ---------------------------------------------------------------------------- the kinds


class Update:
    """Base of every kind: shape (Linear orientation), storage, α/scale, `factored`, `delta_weight`.

    Subclasses are dataclasses holding the file's tensors; `component` names the pipeline part
    (unet, text_encoder, transformer) when the file records it; `notes` say how an open question
    of the format was settled.
    """

    kind: UpdateKind
    alpha: float | None
    component: str | None
    notes: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]

    @property
    def r(self) -> int | None:
        return None

    @property
    def storage(self) -> Storage:
        return Storage()

    @property
    def fan_in_fan_out(self) -> bool:
        """W stored (d_in, d_out) (GPT-2 Conv1D, embeddings)."""
        return self.storage.transposed is True

    @property
    def use_rslora(self) -> bool:
        return False

    @property
    def alpha_known(self) -> bool:
        return self.alpha is not None

    @property
    def scale(self) -> float:
        """s; 1.0 stands in when α is unknown (reports say "unknown", see `alpha_known`)."""
        raise NotImplementedError

    @property
    def needs_base(self) -> bool:
        """True when ΔW depends on the base weight W₀ (DoRA)."""
        return False

    def tensors(self) -> list[torch.Tensor]:
        """The file's tensors this update is made of."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    @property
    def info(self) -> UpdateInfo:
        return UpdateInfo(self.kind, self.shape, self.r, self.alpha, self.scale if self.alpha_known else None,
                          self.num_parameters(), self.storage, self.component, self.use_rslora, self.notes)

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> Form:
        """ΔW as an exact form (see the module docstring): the file's tensors as they are, or
        products of them formed in `dtype` (float64 where the file's tensors are) after
        normalizing each. `base`: W₀ (d_out, d_in) for kinds that need it (DoRA)."""
        raise NotImplementedError

    def delta_weight(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW materialized in the base weight's storage shape (tests and small modules only)."""
        return self.storage.stored(materialize(self.factored(torch.float64, base)).to(dtype))


def materialize(form: Form) -> torch.Tensor:
    """The d_out × d_in matrix of a form, float64 (for tests and `delta_weight`)."""
    if isinstance(form, LowRankForm):
        A = form.A.double() if form.e is None else form.A.double() * form.e.double()[:, None]
        return form.scale.apply(form.B.double() @ A)
    if isinstance(form, DenseForm):
        return form.scale.apply(form.M.double())
    if isinstance(form, KroneckerForm):
        return form.scale.apply(torch.kron(materialize(form.left), materialize(form.right)))
    return torch.block_diag(*(materialize(block) for block in form.blocks))


def _dtype_for(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: float64 when any of the tensors is, else `dtype` (≥ float32)."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        raise LoraAnalysisError(f"compute dtype must be float32 or float64, got {dtype}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else dtype


@dataclass
class LoraModule(Update):
    """Low-rank update ΔW = s · B A (Hu et al. 2021), A: (r, d_in), B: (d_out, r), s = α/r
    (α/√r with rsLoRA). Conv factors come matricized (kohya / PEFT conv: down (r, c_in, kh, kw)
    → (r, c_in·kh·kw), up (c_out, r, 1, 1) → (c_out, r)) with `kernel` set.

    A and B keep the `nn.Linear` orientation; `fan_in_fan_out` (GPT-2 Conv1D) and embeddings
    only transpose ΔW in storage (`transposed` None: the file does not say, as in loralib).
    `alpha` None: unknown; s = 1.0 stands in (`alpha_known` False). `bias`: PEFT's lora_B.bias
    (lora_bias), the update of the layer's bias Δb = s·bias (not part of ΔW). `parts`: a fused
    projection's n adapted parts sharing the factors (LitGPT qkv, loralib MergedLinear):
    A: (n·r, d_in), B: (d_out, n·r) block-structured, r per part.
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float | None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    kernel: tuple[int, ...] | None = None
    transposed: bool | None = False
    component: str | None = None
    notes: tuple[str, ...] = ()
    bias: torch.Tensor | None = None
    parts: int = 1
    weight_suffix: str | None = None
    kind: UpdateKind = field(default="lora", init=False)

    @property
    def r(self) -> int:
        return self.A.shape[0] // self.parts

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def storage(self) -> Storage:
        return Storage(transposed=True if self.fan_in_fan_out else self.transposed, kernel=self.kernel,
                       weight_suffix=self.weight_suffix)

    @property
    def scale(self) -> float:
        """s = α/r (α/√r with rsLoRA); 1.0 when α is unknown (`config.lora_scale`)."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    @property
    def effective_alpha(self) -> float:
        """α, or when it is unknown the α giving the s = 1.0 used instead (r, or √r with rsLoRA)."""
        return effective_alpha(self.alpha, self.r, self.use_rslora)

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.B] + ([] if self.bias is None else [self.bias])

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> LowRankForm:
        return LowRankForm(self.B, self.A, Scale(1.0).times(self.scale))

    def delta_weight(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """Materialized ΔW = s·B·A in storage shape: (d_out, d_in), (d_in, d_out) for
        fan_in_fan_out / embeddings, (c_out, c_in, *kernel) for convs. Tests and small modules only."""
        return self.storage.stored(delta_weight(self.A, self.B, self.scale, False, dtype))


def delta_weight(
    A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Materialized ΔW = s·B·A in `dtype`: A: (r, d_in), B: (d_out, r) → (d_out, d_in), or its
    transpose (d_in, d_out), the base weight's storage orientation, for fan_in_fan_out."""
    delta = scale * (B.to(dtype) @ A.to(dtype))
    return delta.T if fan_in_fan_out else delta


@dataclass
class AdaLoraModule(LoraModule):
    """PEFT AdaLoRA: ΔW = (α / (ranknum + 1e-5)) · B diag(E) A, A: (r, d_in), E: (r,), B: (d_out, r).

    r is the kept rank (rows of A after pruning, possibly 0); ranknum the rank PEFT built the
    layer with (init_r; 0 for a module pruned to rank 0, whose ΔW = 0 whatever the scale).
    """

    E: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    ranknum: float = 0.0
    kind: UpdateKind = field(default="adalora", init=False)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / (self.ranknum + ADALORA_EPSILON)

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.B, self.E]

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> LowRankForm:
        return LowRankForm(self.B, self.A, Scale(1.0).times(self.scale), self.E.reshape(-1))

    def delta_weight(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        return Update.delta_weight(self, dtype, base)


@dataclass(kw_only=True)
class _ScaledUpdate(Update):
    """Fields shared by the LyCORIS-family kinds: s = α / divisor (divisor: r, or √r with rsLoRA)."""

    alpha: float | None
    divisor: float
    kernel: tuple[int, ...] | None = None
    component: str | None = None
    notes: tuple[str, ...] = ()
    weight_suffix: str | None = None

    @property
    def storage(self) -> Storage:
        return Storage(kernel=self.kernel, weight_suffix=self.weight_suffix)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.divisor


@dataclass(kw_only=True)
class TuckerModule(_ScaledUpdate):
    """LyCORIS LoCon with Tucker (`lora_mid`) on a conv kernel (c_out, c_in, *kernel):

        ΔW[o, c, h, w] = s · Σ_ab up[o, a] mid[a, b, h, w] down[b, c]
        ΔW_flat = s · up · M,  M[a, (c, h, w)] = Σ_b mid[a, b, h, w] down[b, c]

    up: (c_out, r), mid: (r, r, *kernel), down: (r, c_in): rank ≤ r, the low-rank route on
    (up, M); the bases "B" / "A" are those of up and of M.
    """

    up: torch.Tensor
    mid: torch.Tensor
    down: torch.Tensor
    kind: UpdateKind = field(default="tucker", init=False)

    @property
    def r(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.up.shape[0], self.down.shape[1] * math.prod(self.mid.shape[2:]))

    def tensors(self) -> list[torch.Tensor]:
        return [self.up, self.mid, self.down]

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> LowRankForm:
        dtype = _dtype_for(self.tensors(), dtype)
        mid, e_mid = normalized(self.mid, dtype)
        down, e_down = normalized(self.down, dtype)
        # M: (r, c_in, *kernel) → (r, c_in·∏kernel), W's flattening per output channel
        M = torch.einsum("ab...,bc->ac...", mid, down).reshape(self.r, -1)
        return LowRankForm(self.up, M, Scale(1.0).times(self.scale, e_mid + e_down))


def row_khatri_rao(X: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Face-splitting product X ⊙ P: (m, r1·r2), row i = X[i] ⊗ P[i] (X: (m, r1), P: (m, r2))."""
    return (X[:, :, None] * P[:, None, :]).reshape(X.shape[0], -1)


def column_khatri_rao(Y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Column-wise Khatri–Rao Y ⊙ Q: (r1·r2, n), column j = Y[:, j] ⊗ Q[:, j]."""
    return (Y[:, None, :] * Q[None, :, :]).reshape(-1, Y.shape[1])


@dataclass(kw_only=True)
class LohaModule(_ScaledUpdate):
    """LoHa (LyCORIS, PEFT): ΔW = s · (X Y) ∘ (P Q), the Hadamard product of two low-rank products,

        X = w1_a: (d_out, r1), Y = w1_b: (r1, d_in), P = w2_a: (d_out, r2), Q = w2_b: (r2, d_in)
        (X Y) ∘ (P Q) = (X ⊙ P)(Y ⊙ Q)

    with the row-wise Khatri–Rao (face-splitting) product X ⊙ P: (d_out, r1·r2) and the
    column-wise one Y ⊙ Q: (r1·r2, d_in): rank ≤ r1·r2, the low-rank route. Convs: w*_b are
    (r, c_in·kh·kw), ΔW flattened per output channel. s = α / r. The Khatri–Rao factors are no
    trained factors: the bases "A" / "B" do not exist for this kind.
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    kind: UpdateKind = field(default="loha", init=False)

    @property
    def r(self) -> int:
        return self.w1_b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [self.w1_a, self.w1_b, self.w2_a, self.w2_b]

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> LowRankForm:
        dtype = _dtype_for(self.tensors(), dtype)
        (X, e_X), (Y, e_Y), (P, e_P), (Q, e_Q) = (normalized(t, dtype) for t in self.tensors())
        scale = Scale(1.0).times(self.scale, e_X + e_Y + e_P + e_Q)
        return LowRankForm(row_khatri_rao(X, P), column_khatri_rao(Y, Q), scale, factor_bases=False)


@dataclass
class KroneckerFactor:
    """One side of a LoKr update: a full matrix `full` (m, n), or the product a @ b, a: (m, r), b: (r, n)."""

    full: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.full is not None:
            return (self.full.shape[0], self.full.shape[1])
        assert self.a is not None and self.b is not None
        return (self.a.shape[0], self.b.shape[1])

    @property
    def rank(self) -> int | None:
        return None if self.a is None else self.a.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.full, self.a, self.b) if t is not None]

    def form(self) -> "LowRankForm | DenseForm":
        if self.full is not None:
            return DenseForm(self.full, Scale(1.0))
        assert self.a is not None and self.b is not None
        return LowRankForm(self.a, self.b, Scale(1.0), factor_bases=False)


@dataclass(kw_only=True)
class LokrModule(_ScaledUpdate):
    """LoKr (LyCORIS, PEFT): ΔW = s · (w1 ⊗ w2), w1: (a, c), w2: (b, d·∏kernel), each full or
    the product w_a w_b; ΔW: (a·b, c·d·∏kernel) is W flattened per output channel.

    σ(w1 ⊗ w2) = {σᵢ(w1)·σⱼ(w2)}; the singular vectors are Kronecker products of the factors'
    (KroneckerForm): exact, never forming ΔW. s = α / r, except where the tool ignores α
    (`alpha_ignored`: LyCORIS with both factors full uses s = 1). No bases "A" / "B".
    """

    w1: KroneckerFactor
    w2: KroneckerFactor
    alpha_ignored: bool = False
    config_rank: int | None = None  # PEFT: the config's r, which scales even two full factors
    kind: UpdateKind = field(default="lokr", init=False)

    @property
    def r(self) -> int | None:
        if self.w1.rank is not None:
            return self.w1.rank
        return self.w2.rank if self.w2.rank is not None else self.config_rank

    @property
    def shape(self) -> tuple[int, int]:
        (a, c), (b, d) = self.w1.shape, self.w2.shape
        return (a * b, c * d)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha_ignored else super().scale

    @property
    def alpha_known(self) -> bool:
        return self.alpha_ignored or self.alpha is not None

    def tensors(self) -> list[torch.Tensor]:
        return self.w1.tensors() + self.w2.tensors()

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> KroneckerForm:
        return KroneckerForm(self.w1.form(), self.w2.form(), Scale(1.0).times(self.scale))


@dataclass(kw_only=True)
class DenseModule(_ScaledUpdate):
    """A materialized ΔW = s · delta, delta: (d_out, d_in) (loralib Conv2d's (B·A).view(...), whose
    reshape does not keep the rank of B·A; full fine-tuning W_ft − W₀). Its exact SVD forms the
    d_out × d_in matrix: the one documented exception to working on factors. `factor_rank`: r of
    the factors it was made from, if any."""

    delta: torch.Tensor
    factor_rank: int | None = None
    kind: UpdateKind = field(default="dense", init=False)

    @property
    def r(self) -> int | None:
        return self.factor_rank

    @property
    def shape(self) -> tuple[int, int]:
        return (self.delta.shape[0], self.delta.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [self.delta]

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> DenseForm:
        return DenseForm(self.delta, Scale(1.0).times(self.scale))


@dataclass
class ExpertsModule(Update):
    """LoRA on a fused expert parameter (E, d_out, d_in) (PEFT `target_parameters`): expert e has
    its own ΔW_e = s · B_e A_e. As one operator ΔW = diag(ΔW_1, …, ΔW_E): (E·d_out, E·d_in),
    whose singular values are the union of the experts' (BlockDiagonalForm)."""

    experts: list[LoraModule]
    component: str | None = None
    notes: tuple[str, ...] = ()
    kind: UpdateKind = field(default="lora", init=False)

    @property
    def alpha(self) -> float | None:  # type: ignore[override]
        return self.experts[0].alpha

    @property
    def r(self) -> int:
        return self.experts[0].r

    @property
    def shape(self) -> tuple[int, int]:
        d_out, d_in = self.experts[0].shape
        return (d_out * len(self.experts), d_in * len(self.experts))

    @property
    def storage(self) -> Storage:
        return Storage(experts=len(self.experts))

    @property
    def scale(self) -> float:
        return self.experts[0].scale

    @property
    def use_rslora(self) -> bool:
        return self.experts[0].use_rslora

    def tensors(self) -> list[torch.Tensor]:
        return [t for e in self.experts for t in e.tensors()]

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> BlockDiagonalForm:
        return BlockDiagonalForm(tuple(e.factored(dtype) for e in self.experts))


class _Wrapper(Update):
    """An update described by another one it wraps (`inner`): α, shape, storage, scale, r."""

    @property
    def inner(self) -> Update:
        raise NotImplementedError

    @property
    def alpha(self) -> float | None:  # type: ignore[override]
        return self.inner.alpha

    @property
    def component(self) -> str | None:  # type: ignore[override]
        return self.inner.component

    @property
    def r(self) -> int | None:
        return self.inner.r

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def storage(self) -> Storage:
        return self.inner.storage

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def alpha_known(self) -> bool:
        return self.inner.alpha_known

    @property
    def use_rslora(self) -> bool:
        return self.inner.use_rslora


@dataclass
class DoraModule(_Wrapper):
    """DoRA (Liu et al. 2024; PEFT `lora_magnitude_vector`, LyCORIS `dora_scale`, torchtune
    `magnitude`): with the direction update ΔW_dir (another kind, usually s·B·A),

        V = W₀ + ΔW_dir,   ΔW = diag(m / (‖V‖_row + ε)) V − W₀

    norms per output row (a conv's whole output channel, c_in·kh·kw); with `norm_on_output`
    False (LyCORIS `wd_on_output=False`) per input channel instead: ΔW = V diag(m / (‖V‖_col + ε))
    − W₀, m: (c_in,). ε: 0 (PEFT, torchtune) or the magnitudes' dtype eps (LyCORIS).

    ΔW is full rank in general and needs W₀: `factored(base=W₀)` forms it, one module at a time,
    for an exact SVD. Without W₀ the analysis refuses, unless the user asks for the direction
    update alone (`direction()`), which every output then labels.
    """

    direction_update: Update
    magnitude: torch.Tensor
    norm_on_output: bool = True
    epsilon: float = 0.0
    kind: UpdateKind = field(default="dora", init=False)

    @property
    def inner(self) -> Update:
        return self.direction_update

    @property
    def notes(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.direction_update.notes

    @property
    def needs_base(self) -> bool:
        return True

    def tensors(self) -> list[torch.Tensor]:
        return self.direction_update.tensors() + [self.magnitude]

    def direction(self) -> "DoraDirection":
        """The direction update s·B·A alone, labelled as such (magnitudes ignored)."""
        return DoraDirection(self)

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> DenseForm:
        if base is None:
            raise LoraAnalysisError("a DoRA update needs its base weight W₀ for ΔW (pass base weights)")
        if tuple(base.shape) != self.shape:
            raise LoraAnalysisError(f"DoRA base weight has shape {tuple(base.shape)}, ΔW has (d_out, d_in) = {self.shape}")
        W0 = base.to(torch.float64)
        V = W0 + materialize(self.direction_update.factored(torch.float64))
        m = self.magnitude.to(torch.float64).reshape(-1)
        if self.norm_on_output:
            updated = V * (m / (torch.linalg.vector_norm(V, dim=1) + self.epsilon))[:, None]
        else:
            grouped = V.reshape(V.shape[0], m.numel(), -1)  # (d_out, c_in, ∏kernel): by input channel
            norms = torch.linalg.vector_norm(grouped, dim=(0, 2)) + self.epsilon
            updated = (grouped * (m / norms)[None, :, None]).reshape(V.shape)
        return DenseForm(updated - W0, Scale(1.0))


@dataclass
class DoraDirection(_Wrapper):
    """The direction update s·B·A of a DoRA module alone (magnitudes ignored): asked for
    explicitly when no base weight is at hand; its kind `dora-direction` labels every output."""

    dora: DoraModule
    kind: UpdateKind = field(default="dora-direction", init=False)

    @property
    def inner(self) -> Update:
        return self.dora.direction_update

    @property
    def notes(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.dora.notes + (DIRECTION_NOTE,)

    def tensors(self) -> list[torch.Tensor]:
        return self.dora.tensors()

    def factored(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> Form:
        return self.dora.direction_update.factored(dtype)


DIRECTION_NOTE = "DoRA read as its direction update s·B·A alone (magnitudes ignored), not its ΔW"
