"""loralib (microsoft/LoRA) state dicts: `torch.save(lora.lora_state_dict(model))`, keys
`<module>.lora_A` / `<module>.lora_B` (no `.weight`), plus the model's biases where saved.

    Linear     A (r, d_in) · B (d_out, r)                    ΔW = s·B·A (fan_in_fan_out: stored transposed)
    Embedding  A (r, num_embeddings) · B (dim, r)            ΔW = s·(B·A)ᵀ in storage
    MergedLinear  A (r·n, d_in) · B (n·rows, r)              n enabled parts of a fused projection
    Conv2d     A (r·k, c_in·k) · B (c_out·k, r·k)            ΔW = s·(B·A).view(c_out, c_in, k, k)

The file records no α, no config and no layer types. A Linear, an Embedding and a Conv2d
give factors of the same form, and for a Conv2d with k > 1 the `view` does not keep the rank
of B·A: its ΔW is formed (kind dense). So convs are read as convs only with the base model's
weight shapes (`weight_shapes`: `<module>.conv.weight` is 4-D); without them every module is
read as Linear/Embedding (ΔW = s·B·A, orientation not recorded) and the adapter says so.
MergedLinear parts are equal (loralib requires it); which parts are adapted, and where they
sit in W, is not recorded: the update covers the adapted parts' rows.
"""

from __future__ import annotations

import torch

from ...errors import ModuleResolutionError, shown
from ...naming import resolve_module_name
from ..updates import DenseModule, LoraModule, Update
from .common import AdapterFiles, Builder, ReadResult, Reader, group_by_suffix, matricize, require_pair, spec, unexpected_key
from .litgpt import fused_update

ROLES = {".lora_A": "A", ".lora_B": "B"}
LAYER_NOTE = ("loralib files do not record layer types: modules read as Linear/Embedding (ΔW = s·B·A); a loralib "
              "Conv2d's ΔW is (B·A).view(c_out, c_in, k, k): pass the base weights to read convs exactly")
MERGED_NOTE = ("loralib MergedLinear: which parts of the fused projection are adapted, and where they sit in W, "
               "is not recorded; shape and singular vectors cover the adapted parts' rows")


class LoralibReader(Reader):
    name = "loralib"

    def detect(self, files: AdapterFiles) -> bool:
        return any(k.endswith((".lora_A", ".lora_B")) for k in files.keys)

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        groups, rest = group_by_suffix(files, files.keys, ROLES)
        result = ReadResult(self.name, {})
        for key in rest:
            if any(part.startswith("lora_") for part in key.split(".")):
                raise unexpected_key(files, self.name, key)
            result.extra[key] = key
        merged = False
        for name, roles in groups.items():
            require_pair(files, name, roles)
            A_shape, B_shape = files.tensors.shape(roles["A"]), files.tensors.shape(roles["B"])
            kernel = self._conv_kernel(files, name)
            if len(A_shape) == 2 and len(B_shape) == 2 and A_shape[0] != B_shape[1] and B_shape[1] \
                    and A_shape[0] % B_shape[1] == 0 and kernel is None:
                merged = True
                result.modules[(None, name)] = spec(dict(roles), self._merged_builder(files, name, alpha))
            elif kernel is not None:
                result.modules[(None, name)] = spec(dict(roles), self._conv_builder(files, name, alpha, kernel))
            else:
                result.modules[(None, name)] = spec(dict(roles), self._linear_builder(files, name, alpha))
        if files.weight_shapes is None and groups:
            result.notes.append(LAYER_NOTE)
        if merged:
            result.notes.append(MERGED_NOTE)
        return result

    def _conv_kernel(self, files: AdapterFiles, name: str) -> tuple[int, ...] | None:
        """The kernel of module `name`'s weight when the base shapes say it is a conv (loralib's
        Conv2d wraps the conv as `<module>.conv`)."""
        shapes = files.weight_shapes
        if not shapes:
            return None
        for candidate in (f"{name}.conv.weight", f"{name}.weight"):
            try:
                key = resolve_module_name(candidate, list(shapes), "base weights")
            except ModuleResolutionError:
                continue
            if len(shapes[key]) == 4:
                return tuple(shapes[key][2:])
            return None
        return None

    def _linear_builder(self, files: AdapterFiles, name: str, alpha: float | None) -> Builder:
        def build(tensors: dict[str, torch.Tensor]) -> Update:
            A, B, _ = matricize(files, name, tensors["A"], tensors["B"])
            return LoraModule(A=A, B=B, alpha=alpha, transposed=None)

        return build

    def _merged_builder(self, files: AdapterFiles, name: str, alpha: float | None) -> Builder:
        def build(tensors: dict[str, torch.Tensor]) -> Update:
            A, B = tensors["A"], tensors["B"]
            n = A.shape[0] // B.shape[1]
            if B.shape[0] % n:
                raise files.fail(f"MergedLinear module {shown(name)!r}: lora_B's {B.shape[0]} rows do not split into "
                                 f"{n} equal parts")
            return fused_update(files, name, A, B, [B.shape[0] // n] * n, [True] * n, alpha, transposed=None)

        return build

    def _conv_builder(self, files: AdapterFiles, name: str, alpha: float | None, kernel: tuple[int, ...]) -> Builder:
        k = kernel[0]

        def build(tensors: dict[str, torch.Tensor]) -> Update:
            A, B = tensors["A"], tensors["B"]
            ok = len(set(kernel)) == 1 and A.ndim == 2 and B.ndim == 2 and A.shape[0] == B.shape[1] \
                and A.shape[0] % k == 0 and A.shape[1] % k == 0 and B.shape[0] % k == 0
            if not ok:
                raise files.fail(f"loralib Conv2d module {shown(name)!r} (kernel {kernel}): lora_A {tuple(A.shape)} and "
                                 f"lora_B {tuple(B.shape)} are not (r·k, c_in·k) and (c_out·k, r·k)")
            r, c_out = A.shape[0] // k, B.shape[0] // k
            if k == 1:
                return LoraModule(A=A, B=B, alpha=alpha, kernel=kernel, weight_suffix="conv")
            # (B·A).view(c_out, c_in, k, k), flattened per output channel; formed in float64
            delta = (B.double() @ A.double()).reshape(c_out, -1)
            return DenseModule(alpha=alpha, divisor=float(r), delta=delta, kernel=kernel, factor_rank=r,
                               weight_suffix="conv")

        return build
