"""The fuzz suite's seeds, mutations and float64 oracle (used by tests/test_fuzz.py).

A *seed* is an adapter written to a folder (by our writer, by hand in kohya's or loralib's
layout, or copied from tests/fixtures/formats). A *mutant* is a seed with its config, its
tensors or its bytes changed. The oracle reads a mutant with its own code — a safetensors
parser written from the format's specification, Python's `json`, PEFT's own pattern rule — and
predicts the singular values of every module's ΔW = s·B·A in float64; where it cannot
interpret the file (a layout it does not know, a pickle it cannot read) it predicts nothing and
only the report's self-consistency is checked.

Adding a format fixture as a seed is one line in `SEEDS`: `"fixture:<folder name>"`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

FIXTURES = Path(__file__).parent / "fixtures" / "formats"

SEEDS = [
    "peft_dir",          # our writer: adapter_model.safetensors + adapter_config.json
    "peft_file",         # our writer: one self-describing .safetensors (config in the header)
    "kohya",             # lora_down / lora_up / alpha, hand-written
    "loralib_pt",        # .pt state dict (torch.save), alpha unknown
    "fixture:peft_lora_linear",
    "fixture:peft_rslora_patterns",
    "fixture:peft_lora_gpt2_conv1d",
    "fixture:lycoris_locon",
    "fixture:lycoris_loha",       # LoHa (oracle: LyCORIS's ΔW formed in float64)
    "fixture:lycoris_lokr",       # LoKr, full and factored sides, conv
    "fixture:lycoris_locon_tucker",
    "fixture:lycoris_dora",
    "fixture:peft_loha",
    "fixture:peft_lokr",
    "fixture:peft_dora",
    "fixture:diffusers_unet_text_encoder",
    "fixture:torchtune_lora",
]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _name, _dtype in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _dtype):
        DTYPES[_name] = getattr(torch, _dtype)

PEFT_PREFIX = "base_model.model."
LAYOUTS = {"peft": (".lora_A.weight", ".lora_B.weight"), "kohya": (".lora_down.weight", ".lora_up.weight"),
           "loralib": (".lora_A", ".lora_B")}


# ----------------------------------------------------------------------------- seeds


def make_seed(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write seed `kind` into `folder` (created); returns the path to give the CLI."""
    from lora_analysis import Adapter, LoraConfig, LoraModule, save_adapter

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("fixture:"):
        source = FIXTURES / kind.split(":", 1)[1]
        expected = json.loads((source / "expected.json").read_text())
        for name in expected["adapter_files"]:
            shutil.copy(source / name, folder / name)
        files = expected["adapter_files"]
        return folder if len(files) > 1 or files[0].startswith("adapter_model") else folder / files[0]
    if kind in ("peft_dir", "peft_file"):
        modules = {f"model.layers.{i}.self_attn.{p}": LoraModule(torch.randn(2 + i, 6, generator=g),
                                                                 torch.randn(5, 2 + i, generator=g), 4.0)
                   for i in range(2) for p in ("q_proj", "v_proj")}
        config = LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\..*": 3})
        return save_adapter(Adapter(modules, config), folder / ("adapter" if kind == "peft_dir" else "adapter.safetensors"))
    if kind == "kohya":
        tensors = {}
        for i in range(2):
            tensors[f"lora_unet_block_{i}_attn.lora_down.weight"] = torch.randn(3, 7, generator=g)
            tensors[f"lora_unet_block_{i}_attn.lora_up.weight"] = torch.randn(4, 3, generator=g)
            tensors[f"lora_unet_block_{i}_attn.alpha"] = torch.tensor(2.0 + i)
        path = folder / "kohya.safetensors"
        path.write_bytes(safetensors_bytes(tensors))
        return path
    if kind == "loralib_pt":
        path = folder / "lora.pt"
        torch.save({"encoder.layer.0.query.lora_A": torch.randn(2, 6, generator=g),
                    "encoder.layer.0.query.lora_B": torch.randn(5, 2, generator=g)}, path)
        return path
    raise ValueError(kind)


# ----------------------------------------------------------------------------- safetensors by the spec


@dataclass
class Safetensors:
    """A safetensors file as the specification defines it: header JSON + raw little-endian data."""

    header: dict[str, Any]
    metadata: dict[str, Any] | None
    data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> "Safetensors | None":
        if len(raw) < 8:
            return None
        n = struct.unpack("<Q", raw[:8])[0]
        if n > len(raw) - 8:
            return None
        try:
            header = json.loads(raw[8:8 + n].decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(header, dict):
            return None
        metadata = header.pop("__metadata__", None)
        return cls(header, metadata if isinstance(metadata, dict) else None, raw[8 + n:])

    def tensor(self, key: str) -> np.ndarray | None:
        """float64 values of one tensor, or None where its entry breaks the specification."""
        entry = self.header.get(key)
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        count = math.prod(shape) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or not 0 <= begin <= end <= len(self.data) or end - begin != count * itemsize:
            return None
        values = torch.frombuffer(bytearray(self.data[begin:end]) or bytearray(itemsize), dtype=dtype)[:count]
        return values.to(torch.float64).reshape(shape).numpy()

    def to_bytes(self) -> bytes:
        header = dict(self.header)
        if self.metadata is not None:
            header["__metadata__"] = self.metadata
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + self.data


def _no_constant(token: str) -> Any:
    raise ValueError(token)


# ----------------------------------------------------------------------------- the oracle


# kohya's lora-name prefixes (sd-scripts' LoRANetwork, LyCORIS's wrapper) → pipeline component
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                  ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"), ("lycoris_", "model"))


@dataclass
class Prediction:
    """What a correct reader must report: module name → singular values (float64, descending)
    of ΔW = s·B·A with s from the recorded α (1 where it is unknown).

    kohya: names are keyed `component:mangled path` — a kohya lora name writes the path's "."
    as "_", which only a table of module words undoes; the oracle compares the mangled forms
    (`report_key` mangles the report's name the same way) and leaves the table to the reader's
    own tests."""

    singular_values: dict[str, np.ndarray] = field(default_factory=dict)
    kohya: bool = False

    def report_key(self, name: str, module: dict) -> str:
        if not self.kohya:
            return name
        component = module.get("component")
        if component is None:
            return f":{name}"
        path = name.removeprefix(f"{component}/")
        return f"{component}:{path.replace('.', '_')}"


def predict(path: Path) -> Prediction | None:
    """The oracle's prediction for the adapter at `path`, or None where it cannot interpret it."""
    weights = path
    if path.is_dir():
        weights = path / "adapter_model.safetensors"
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    parsed = Safetensors.parse(weights.read_bytes())
    if parsed is None:
        return None
    tensors = {key: parsed.tensor(key) for key in parsed.header}
    if any(t is None for t in tensors.values()):
        return None
    if _is_lycoris(tensors):
        return _predict_lycoris(tensors)
    if _is_peft_lycoris(tensors):
        config = _config(path, weights, parsed, peft_types=("LOHA", "LOKR"))
        return _predict_lycoris(tensors, config) if config else None
    layout = _layout(tensors)
    if layout is None:
        return None
    config = _config(path, weights, parsed) if layout == "peft" else None
    if config is False:
        return None
    a_suffix, b_suffix = LAYOUTS[layout]
    prediction = Prediction(kohya=layout == "kohya")
    names = {key[: -len(a_suffix)] for key in tensors if key.endswith(a_suffix)}
    if {key[: -len(b_suffix)] for key in tensors if key.endswith(b_suffix)} != names:
        return None
    for raw_name in names:
        A, B = tensors[raw_name + a_suffix], tensors[raw_name + b_suffix]
        if layout == "kohya" and A.ndim == 4 and B.ndim == 4:  # conv: (r, c_in, kh, kw), (c_out, r, 1, 1)
            A, B = A.reshape(A.shape[0], math.prod(A.shape[1:])), B.reshape(B.shape[0], math.prod(B.shape[1:]))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or 0 in A.shape + B.shape:
            return None
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            return None
        name = raw_name.removeprefix(PEFT_PREFIX) if layout == "peft" else raw_name
        if layout == "kohya":
            name = _kohya_key(raw_name)
            if name is None:
                return None
        r = A.shape[0]
        scale = _scale(layout, raw_name, name, r, tensors, config)
        if scale is None:
            return None
        prediction.singular_values[name] = _singular_values(A, B, scale)
    if len(prediction.singular_values) != len(names):
        return None  # two raw names for one module
    return prediction


LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
LOKR = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")


def _is_peft_lycoris(tensors: dict[str, Any]) -> bool:
    """A PEFT LoHa/LoKr file the oracle reads: every key a prefixed LoHa/LoKr factor."""
    return bool(tensors) and all(k.startswith(PEFT_PREFIX) and k.endswith(LOHA + LOKR) for k in tensors)


def _is_lycoris(tensors: dict[str, Any]) -> bool:
    """A LyCORIS LoHa/LoKr file the oracle reads: every key a LoHa/LoKr factor or an α."""
    return (any(k.endswith(LOHA + LOKR) for k in tensors) and not any(k.startswith(PEFT_PREFIX) for k in tensors)
            and all(k.endswith(LOHA + LOKR + (".alpha",)) for k in tensors))


def _predict_lycoris(tensors: dict[str, np.ndarray], peft_config: dict | None = None) -> Prediction | None:
    """σ of LyCORIS's and PEFT's own ΔW definitions, formed in float64 (fixtures are small):

        LoHa  ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · s
        LoKr  ΔW = w1 ⊗ w2 · s  (w = w_a·w_b where factored)

    LyCORIS (kohya keys, `.alpha`): s = α/r with r the factored sides' rank, s = 1 for a LoKr
    with two full sides; α missing or 0 means α = r. PEFT (`peft_config`): s = α/r with the
    config's `alpha` and `r` (and patterns), whatever the factors (LoKr's full sides too); a
    factored side's rank must be that r. Conv factors are flattened per output channel first:
    σ does not depend on the order of the flattened columns."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        raw, _, role = key.rpartition(".")
        groups.setdefault(raw, {})[role] = value
    prediction = Prediction(kohya=peft_config is None)
    for raw, roles in groups.items():
        name = _kohya_key(raw) if peft_config is None else raw.removeprefix(PEFT_PREFIX)
        if name is None or name in prediction.singular_values:
            return None
        found = _lycoris_delta(roles)
        if found is None:
            return None
        delta, exponent, r = found
        scale = _lycoris_scale(roles, r) if peft_config is None else _peft_lycoris_scale(peft_config, name, r)
        if scale is None or not np.isfinite(delta).all():
            return None
        prediction.singular_values[name] = _dense_singular_values(delta, exponent, scale)
    return prediction


def _lycoris_scale(roles: dict[str, np.ndarray], r: int | None) -> float | None:
    alpha = roles.get("alpha")
    if alpha is not None and (alpha.size != 1 or not np.isfinite(alpha).all()):
        return None
    value = float(alpha.reshape(())) if alpha is not None else 0.0
    return 1.0 if r is None or value == 0 else value / r


def _peft_lycoris_scale(config: dict, name: str, r: int | None) -> float | None:
    """PEFT LoHa/LoKr: s = alpha / r from the config (defaults r = alpha = 8, PEFT's)."""
    if config.get("use_rslora") or name in config.get("_alpha_unknown", ()):
        return None
    try:
        rank = _peft_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _peft_value(config.get("alpha_pattern") or {}, name, config.get("alpha", 8))
    except re.error:
        return None
    numbers = [x for x in (rank, alpha) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    if len(numbers) != 2 or not isinstance(rank, int) or rank < 1 or (r is not None and r != rank):
        return None
    return alpha / rank


def _lycoris_delta(roles: dict[str, np.ndarray]) -> tuple[np.ndarray, int, int | None] | None:
    """(M, e, r): ΔW / s = M·2**e flattened to 2-D (every factor normalised by a power of two
    first, so forming it neither overflows nor underflows), r or None when no side is factored;
    None where the oracle does not interpret the roles."""
    def normal(x: np.ndarray) -> tuple[np.ndarray, int]:
        x = x.reshape(x.shape[0], -1)
        peak = float(np.abs(x).max()) if x.size else 0.0
        e = math.frexp(peak)[1] if peak else 0
        return np.ldexp(x, -e), e

    def product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int] | None:
        if a.ndim != 2 or b.ndim < 2 or a.shape[1] != b.shape[0] or 0 in a.shape + b.shape:
            return None
        (na, ea), (nb, eb) = normal(a), normal(b)
        return na @ nb, ea + eb

    keys = set(roles) - {"alpha"}
    if keys == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        w1, w2 = product(roles["hada_w1_a"], roles["hada_w1_b"]), product(roles["hada_w2_a"], roles["hada_w2_b"])
        if w1 is None or w2 is None or w1[0].shape != w2[0].shape or roles["hada_w1_b"].shape[0] != roles["hada_w2_b"].shape[0]:
            return None
        return w1[0] * w2[0], w1[1] + w2[1], roles["hada_w1_b"].shape[0]
    sides, ranks = [], []
    for side in ("lokr_w1", "lokr_w2"):
        w: tuple[np.ndarray, int] | None
        if keys >= {f"{side}_a", f"{side}_b"} and side not in keys:
            w = product(roles[f"{side}_a"], roles[f"{side}_b"])
            ranks.append(roles[f"{side}_b"].shape[0])
        elif side in keys and not keys & {f"{side}_a", f"{side}_b"} and roles[side].ndim >= 2 and roles[side].size:
            w = normal(roles[side])
        else:
            return None
        if w is None:
            return None
        sides.append(w)
    if len(keys) != 2 + len(ranks) or len(set(ranks)) > 1 or roles.get("lokr_w1", np.zeros((1, 1))).ndim != 2:
        return None
    return np.kron(sides[0][0], sides[1][0]), sides[0][1] + sides[1][1], (ranks[0] if ranks else None)


def _dense_singular_values(delta: np.ndarray, exponent: int, scale: float) -> np.ndarray:
    """σ(s·M·2**exponent) in float64: the SVD of M normalised by its peak, s and the powers of
    two multiplied in at the end (one rounding; inf or 0 where σ leaves float64's range)."""
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    if peak == 0 or scale == 0:
        return np.zeros(min(delta.shape))
    (m_peak, e_peak), (m_scale, e_scale) = math.frexp(peak), math.frexp(abs(scale))
    core = np.linalg.svd(delta / peak, compute_uv=False)
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(core * (m_peak * m_scale), exponent + e_peak + e_scale)


def _kohya_key(raw: str) -> str | None:
    """`component:mangled path` of a kohya lora name (see `Prediction`); None for names whose
    mangled form the oracle cannot compare ("." or "/" inside a prefixed name)."""
    for prefix, component in KOHYA_PREFIXES:
        if raw.startswith(prefix) and len(raw) > len(prefix):
            rest = raw[len(prefix):]
            return None if "." in rest or "/" in rest else f"{component}:{rest}"
    return f":{raw}"


def _layout(tensors: dict[str, Any]) -> str | None:
    found = [layout for layout, suffixes in LAYOUTS.items() if any(k.endswith(suffixes) for k in tensors)]
    if len(found) != 1:
        return None
    a_suffix, b_suffix = LAYOUTS[found[0]]
    rest = [k for k in tensors if not k.endswith((a_suffix, b_suffix))]
    if found[0] == "kohya" and any(not k.endswith(".alpha") for k in rest):
        return None
    if found[0] != "kohya" and rest:
        return None  # extra tensors (biases, modules_to_save, DoRA magnitudes): not the oracle's business
    return found[0]


def _config(path: Path, weights: Path, parsed: Safetensors, peft_types: tuple[str, ...] = ("LORA",)) -> dict | None | bool:
    """The PEFT config that applies (None: none; False: one the oracle cannot read)."""
    beside = (path if path.is_dir() else path.parent) / "adapter_config.json"
    text = None
    header_config = (parsed.metadata or {}).get("adapter_config")
    if path.is_dir() and beside.is_file():
        text = beside.read_bytes()
    elif header_config is not None:
        text = header_config
    elif beside.is_file():
        text = beside.read_bytes()
    if text is None:
        return None
    try:
        config = json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError):
        return False
    if not isinstance(config, dict) or config.get("peft_type", "LORA") not in peft_types or config.get("use_dora"):
        return False
    unknown = (parsed.metadata or {}).get("alpha_unknown")
    if unknown is not None:
        try:
            config["_alpha_unknown"] = set(json.loads(unknown))
        except (ValueError, TypeError):
            return False
    return config


def _scale(layout: str, raw_name: str, name: str, r: int, tensors: dict, config: dict | None) -> float | None:
    if layout == "kohya":
        alpha = tensors.get(raw_name + ".alpha")
        if alpha is None:
            return 1.0  # sd-scripts: no alpha means α = r
        if alpha.size != 1 or not np.isfinite(alpha).all():
            return None
        value = float(alpha.reshape(()))
        return 1.0 if value == 0 else value / r  # sd-scripts: α = 0 means α = r too
    if config is None or name in config.get("_alpha_unknown", ()):
        return 1.0  # α unknown: the report uses s = 1 and says so
    try:
        rank = _peft_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _peft_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    except re.error:
        return None
    if rank != r or not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or abs(alpha) > 1.7e308:
        return None
    if not isinstance(config.get("use_rslora", False), bool):
        return None
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _peft_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rule, by PEFT's own code: rank_pattern.get(get_pattern_key(keys, name), default)."""
    from peft.utils.other import get_pattern_key

    if not isinstance(patterns, dict) or len(name) > 40:
        raise re.error("the oracle matches short names only (Python's re backtracks)")
    return patterns.get(get_pattern_key(list(patterns), name), default)


def _singular_values(A: np.ndarray, B: np.ndarray, scale: float) -> np.ndarray:
    """σ(s·B·A) in float64, computed on factors normalised by their largest entry (the product
    itself may overflow or underflow float64; σ scales exactly)."""
    a, b = np.abs(A).max(), np.abs(B).max()
    if a == 0 or b == 0:
        return np.zeros(min(A.shape[0], A.shape[1], B.shape[0]))
    core = np.linalg.svd((B / b) @ (A / a), compute_uv=False)[: min(A.shape[0], A.shape[1], B.shape[0])]
    with np.errstate(over="ignore", under="ignore"):
        return core * (abs(scale) * a * b)


# ----------------------------------------------------------------------------- checks of a report


def check_report(report: dict, prediction: Prediction | None, rtol: float = 2e-4) -> list[str]:
    """Problems with an exit-0 JSON report: against the prediction where there is one, and
    self-consistency always (σ descending and ≥ 0, ‖ΔW‖_F² = Σσ² over the numerical rank)."""
    problems = []
    reasons = report.get("null_reasons", {})
    for name, m in report["modules"].items():
        key = prediction.report_key(name, m) if prediction is not None else name
        sv = m["singular_values"]
        if any(s is None for s in sv):
            if not all(f"/modules/{_token(name)}/singular_values/{i}" in reasons for i, s in enumerate(sv) if s is None):
                problems.append(f"{name}: a null singular value without a reason")
            continue
        if any(s < 0 for s in sv) or any(x < y for x, y in zip(sv, sv[1:])):
            problems.append(f"{name}: singular values not descending and non-negative: {sv}")
        if prediction is not None:
            expected = prediction.singular_values.get(key)
            if expected is None:
                problems.append(f"{name}: reported, but the oracle finds no such module ({sorted(prediction.singular_values)[:3]})")
                continue
            problems += _compare_values(name, np.asarray(sv, dtype=float), expected, rtol)
            problems += _compare_metrics(name, m, expected, reasons, rtol)
    if prediction is not None:
        missing = set(prediction.singular_values) - {prediction.report_key(n, m) for n, m in report["modules"].items()}
        if missing and report["adapter"]["num_analyzed"] == report["adapter"]["num_modules"]:
            problems.append(f"modules the oracle finds but the report lacks: {sorted(missing)[:3]}")
    return problems


def _compare_values(name: str, got: np.ndarray, expected: np.ndarray, rtol: float) -> list[str]:
    top = float(expected.max()) if expected.size else 0.0
    if got.size > expected.size or (got.size < expected.size and not math.isfinite(top)):
        return [f"{name}: {got.size} singular values, the oracle {expected.size}"]
    if not math.isfinite(top):
        return []  # beyond float64: the report must have refused or nulled it (checked above)
    if got.size < expected.size:  # kinds of bounded rank list that many (LoHa: r², LoKr: rank(w1)·rank(w2))
        rest = expected[got.size:]
        if rest.size and float(rest.max()) > rtol * top:
            return [f"{name}: {got.size} singular values, but the oracle's σ_{got.size + 1} = {float(rest.max()):.3g} is not zero"]
        expected = expected[: got.size]
    tiny = np.finfo(np.float64).tiny
    if top < tiny * 1e6:  # σ₁ near float64's subnormal range: only the rank-0 verdict is checkable
        return [] if np.all(got <= top * 2 + tiny) else [f"{name}: σ {got} for an oracle of {expected}"]
    error = np.abs(got - expected).max() / top
    return [] if error <= rtol else [f"{name}: σ {got.tolist()} differ from the float64 oracle {expected.tolist()} "
                                     f"(max error {error:.2e} of σ₁)"]


def _compare_metrics(name: str, module: dict, expected: np.ndarray, reasons: dict, rtol: float) -> list[str]:
    """‖ΔW‖_F, σ₁ and the stable rank against the oracle's σ, computed scale-invariantly (σ/σ₁):
    a value float64 can hold must be reported (not null), and right."""
    top = float(expected.max()) if expected.size else 0.0
    if not math.isfinite(top) or top < np.finfo(np.float64).tiny * 1e6:
        return []
    ratios = expected / top
    oracle = {"sigma_max": top, "frobenius_norm": top * math.sqrt(float(np.sum(ratios**2))),
              "stable_rank": float(np.sum(ratios**2))}
    problems = []
    for key, value in oracle.items():
        got = module[key]
        if not math.isfinite(value):
            continue
        if got is None:
            reason = reasons.get(f"/modules/{_token(name)}/{key}")
            problems.append(f"{name}: {key} is null ({reason}) though float64 holds it: {value:.6g}")
        elif abs(got - value) > rtol * abs(value):
            problems.append(f"{name}: {key} {got!r} differs from the float64 oracle {value!r}")
    return problems


def _token(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


Mutator = Callable[[Path], None]
