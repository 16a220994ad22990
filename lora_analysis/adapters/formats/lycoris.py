"""LyCORIS beyond LoCon: LoHa, LoKr and full (`diff`) modules, in the kohya key layout
(`kohya.py`: lora names, components, `.alpha`, `.dora_scale` for DoRA on any of them).

    hada_w1_a (d_out, r) · hada_w1_b (r, d_in…) · hada_w2_a · hada_w2_b     LoHa, s = α / r
    lokr_w1 | lokr_w1_a, lokr_w1_b ; lokr_w2 | lokr_w2_a, lokr_w2_b         LoKr, s = α / r with r the
                                                                            factored side's rank; s = 1
                                                                            when both sides are full
    diff (the full ΔW, conv: (c_out, c_in, kh, kw)) · diff_b (bias)         full, s = 1

α missing or 0 means α = r, as for LoCon. Tucker cores of LoHa/LoKr (`hada_t1`, `hada_t2`,
`lokr_t2`) and LyCORIS's other algorithms (OFT, BOFT, GLoRA, IA3, norms) are refused.
"""

from __future__ import annotations

import torch

from ...errors import shown
from ..adapter import ModuleSpec
from ..updates import DenseModule, Update
from .common import AdapterFiles, Builder, ReadResult, dora_spec_builder, spec, unexpected_key
from .kohya import LORA_ROLES, KohyaReader, lycoris_epsilon, rank_alpha
from .peft import check_lokr_roles, loha_update, lokr_update

LOHA_ROLES = {".hada_w1_a": "w1_a", ".hada_w1_b": "w1_b", ".hada_w2_a": "w2_a", ".hada_w2_b": "w2_b",
              ".hada_t1": "t1", ".hada_t2": "t2"}
LOKR_ROLES = {".lokr_w1": "w1", ".lokr_w1_a": "w1_a", ".lokr_w1_b": "w1_b", ".lokr_w2": "w2", ".lokr_w2_a": "w2_a",
              ".lokr_w2_b": "w2_b", ".lokr_t2": "t2"}
FULL_ROLES = {".diff": "diff", ".diff_b": "diff_b"}
REFUSED = {"oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT", "a1.weight": "GLoRA", "on_input": "IA3",
           "w_norm": "norm", "b_norm": "norm", "hada_t1": "LoHa with Tucker cores", "lokr_t2": "LoKr with a Tucker core"}


class LycorisReader(KohyaReader):
    """LyCORIS LoHa / LoKr / full modules, and LoCon (through `KohyaReader`)."""

    name = "lycoris"
    roles = {**LORA_ROLES, **LOHA_ROLES, **LOKR_ROLES, **FULL_ROLES}

    def detect(self, files: AdapterFiles) -> bool:
        suffixes = tuple(LOHA_ROLES) + tuple(LOKR_ROLES) + tuple(FULL_ROLES) + tuple(f".{k}" for k in REFUSED)
        return any(k.endswith(suffixes) and not k.startswith("base_model.model.") for k in files.keys)

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        for key in files.keys:
            for marker, algorithm in REFUSED.items():
                if key.endswith("." + marker):
                    raise files.fail(f"LyCORIS {algorithm} module {shown(key.rsplit('.', 1)[0])!r} is not read "
                                     "(LoCon, Tucker LoCon, LoHa, LoKr, full and DoRA are)")
        return super().read(files, alpha)

    def module_spec(self, files: AdapterFiles, raw: str, component: str | None, roles: dict[str, str],
                    alpha: float | None) -> ModuleSpec:
        tables = (("locon", LORA_ROLES), ("loha", LOHA_ROLES), ("lokr", LOKR_ROLES), ("full", FULL_ROLES))
        shared = (".alpha", ".dora_scale")
        kinds = [kind for kind, table in tables
                 if any(key.endswith(suffix) for key in roles.values() for suffix in table if suffix not in shared)]
        if len(kinds) != 1:
            raise files.fail(f"module {shown(raw)!r} mixes the tensors of LyCORIS {' and '.join(kinds) or 'no'} modules")
        if kinds[0] == "locon":
            return super().module_spec(files, raw, component, roles, alpha)
        keys = {role: key for role, key in roles.items() if role not in ("alpha", "diff_b")}
        build = self._builder(files, raw, component, kinds[0], roles, alpha)
        if "magnitude" in roles:
            return spec(keys, dora_spec_builder(files, raw, build, epsilon=lycoris_epsilon, lycoris_layout=True))
        return spec(keys, build)

    def _builder(self, files: AdapterFiles, raw: str, component: str | None, kind: str, roles: dict[str, str],
                 alpha: float | None) -> Builder:
        if kind == "loha":
            missing = [f"hada_{r}" for r in ("w1_a", "w1_b", "w2_a", "w2_b") if r not in roles]
            if missing:
                raise files.fail(f"LoHa module {shown(raw)!r} lacks {', '.join(missing)}")

            def loha(tensors: dict[str, torch.Tensor]) -> Update:
                return loha_update(files, raw, tensors, rank_alpha(alpha, tensors["w1_b"].shape[0]), None, component)

            return loha
        if kind == "lokr":
            check_lokr_roles(files, raw, roles)

            def lokr(tensors: dict[str, torch.Tensor]) -> Update:
                update = lokr_update(files, raw, tensors, alpha, None, alpha_ignored_when_full=True, component=component)
                if not update.alpha_ignored and update.r is not None:
                    update.alpha = rank_alpha(alpha, update.r)
                return update

            return lokr
        if "diff" not in roles:
            raise unexpected_key(files, self.name, roles["diff_b"])

        def full(tensors: dict[str, torch.Tensor]) -> Update:
            diff = tensors["diff"]
            if diff.ndim < 2:
                raise files.fail(f"full module {shown(raw)!r}: diff has shape {tuple(diff.shape)}")
            return DenseModule(alpha=1.0, divisor=1.0, delta=diff.reshape(diff.shape[0], -1),
                               kernel=tuple(diff.shape[2:]) or None, component=component)

        return full
