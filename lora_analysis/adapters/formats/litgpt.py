"""LitGPT's LoRA checkpoint `lit_model.pth.lora`: `torch.save({"model": {...}})`, the tensors
nested under "model", keys `<module>.lora_A` (r, d_in) / `<module>.lora_B` (d_out, r).

The fused attention projection (`attn.qkv`, older `attn.attn`) holds q | k | v rows with LoRA
on some of them (`lora_query`, `lora_key`, `lora_value`): lora_A is (r·n, d_in) for n enabled
parts, lora_B (Σ enabled part rows, r); part i's ΔW rows are B_i A_i, disabled parts' rows are
zero. Under grouped-query attention the parts differ in size (q: n_head·head_size, k and v:
n_query_groups·head_size), so the split of lora_B's rows needs the model's config:
`model_config.yaml`, which LitGPT writes beside every checkpoint. As one low-rank update:

    ΔW = s · B' A',  B' = rows of W ← diag(B_1, …, B_n): (d_out, n·r),  A' = [A_1; …; A_n]: (n·r, d_in)

α: `lora_alpha` of model_config.yaml (LitGPT's LoRA config carries it), else unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import AdapterFormatError, shown
from ..containers import TorchFile
from ..updates import LoraModule, Update
from .common import AdapterFiles, Builder, ReadResult, Reader, group_by_suffix, lora_builder, require_pair, spec, unexpected_key

ROLES = {".lora_A": "A", ".lora_B": "B"}
CONFIG_NAME = "model_config.yaml"
FUSED_SUFFIXES = (".attn.qkv", ".attn.attn")


class LitgptReader(Reader):
    name = "litgpt"

    def detect(self, files: AdapterFiles) -> bool:
        tensors = files.tensors
        return isinstance(tensors, TorchFile) and tensors.root is None and tensors.holds_flat_dict_at(("model",))

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        assert isinstance(files.tensors, TorchFile)
        files.tensors.use_root(("model",))
        groups, rest = group_by_suffix(files, files.keys, ROLES)
        if rest:
            raise unexpected_key(files, self.name, rest[0])
        config = self._config(files)
        if config is not None and config.get("lora_alpha") is not None:
            alpha = float(config["lora_alpha"])
        result = ReadResult(self.name, {})
        for name, roles in groups.items():
            require_pair(files, name, roles)
            if name.endswith(FUSED_SUFFIXES):
                if config is None:
                    raise files.fail(f"fused attention module {shown(name)!r}: splitting its lora_B into q, k, v needs "
                                     f"the model's {CONFIG_NAME}, which LitGPT writes beside its checkpoints")
                build = self._fused_builder(files, name, alpha, config)
            else:
                build = lora_builder(files, name, alpha)
            result.modules[(None, name)] = spec(dict(roles), _in_linear(build))
        return result

    def _config(self, files: AdapterFiles) -> dict[str, Any] | None:
        path = files.beside(CONFIG_NAME)
        if path is None:
            return None
        return read_yaml(path)

    def _fused_builder(self, files: AdapterFiles, name: str, alpha: float | None, config: dict[str, Any]) -> Builder:
        try:
            head_size = int(config.get("head_size") or config["n_embd"] // config["n_head"])
            q_rows = config["n_head"] * head_size
            kv_rows = int(config.get("n_query_groups") or config["n_head"]) * head_size
            enabled = [bool(config.get(f"lora_{part}")) for part in ("query", "key", "value")]
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise files.fail(f"{CONFIG_NAME} lacks n_head, n_embd / head_size or n_query_groups") from None
        rows = [q_rows, kv_rows, kv_rows]

        def build(tensors: dict[str, torch.Tensor]) -> Update:
            return fused_update(files, name, tensors["A"], tensors["B"], rows, enabled, alpha)

        return build


def _in_linear(build: Builder) -> Builder:
    """LitGPT's LoRALinear keeps W as `<module>.linear.weight` in a LoRA model's checkpoint."""

    def wrapped(tensors: dict[str, torch.Tensor]) -> Update:
        update = build(tensors)
        assert isinstance(update, LoraModule)
        update.weight_suffix = "linear"
        return update

    return wrapped


def fused_update(files: AdapterFiles, name: str, A: torch.Tensor, B: torch.Tensor, rows: list[int], enabled: list[bool],
                 alpha: float | None, transposed: bool | None = False) -> LoraModule:
    """One low-rank update of a fused projection with per-part LoRA (LitGPT qkv, loralib
    MergedLinear): A (r·n, d_in), B (Σ enabled rows, r) → B' (Σ rows, n·r), A' = A."""
    n = sum(enabled)
    if A.ndim != 2 or B.ndim != 2 or n == 0 or A.shape[0] != n * B.shape[1]:
        raise files.fail(f"fused module {shown(name)!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                         f"fit {n} enabled part(s) of rank {B.shape[-1]}")
    r = B.shape[1]
    enabled_rows = [size for size, on in zip(rows, enabled) if on]
    if sum(enabled_rows) != B.shape[0]:
        raise files.fail(f"fused module {shown(name)!r}: lora_B has {B.shape[0]} rows, the enabled parts have "
                         f"{enabled_rows}")
    wide = B.new_zeros(sum(rows), n * r)
    row = b_row = part = 0
    for size, on in zip(rows, enabled):
        if on:
            wide[row:row + size, part * r:(part + 1) * r] = B[b_row:b_row + size]
            b_row, part = b_row + size, part + 1
        row += size
    return LoraModule(A=A, B=wide, alpha=alpha, transposed=transposed, parts=n,
                      notes=(f"fused projection: {n} of {len(rows)} parts adapted, rank {r} each",))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping (LitGPT's model_config.yaml), read with the safe loader."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise AdapterFormatError(path, f"cannot read: {shown(str(err).splitlines()[0] if str(err) else err)}") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(path, "expected a YAML mapping of config fields")
    return data
