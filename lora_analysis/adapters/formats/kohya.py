"""kohya sd-scripts LoRA and LyCORIS LoCon (the layout sd-scripts and `lycoris.kohya` write).

Keys `<lora name>.<role>`, the lora name being the module path with "." replaced by "_" behind
a component prefix: `lora_unet_` (unet), `lora_te_` / `lora_te1_` (text_encoder), `lora_te2_`
(text_encoder_2), `lora_te3_` (text_encoder_3), `lycoris_` (a model wrapped by
`lycoris.create_lycoris`).

    lora_down.weight  A: (r, d_in) or (r, c_in, kh, kw)      lora_up.weight  B: (d_out, r) or (c_out, r, 1, 1)
    lora_mid.weight   Tucker core (r, r, kh, kw): down (r, c_in, 1, 1), up (c_out, r, 1, 1)
    alpha             0-dim α; missing or 0 means α = r (both tools' rule), s = α / r
    dora_scale        DoRA magnitude (d_out, 1[, 1, 1]), or (1, d_in…) with wd_on_output=False

Module names: the "_" of a lora name hides which were "." in the model's path. They are
restored with `KNOWN_WORDS`, the identifiers containing "_" in diffusers' and transformers'
module paths (down_blocks, self_attn, q_proj, ...); every other "_" becomes ".". With base
weights the names are matched against the model exactly (`naming.resolve_module_name`
compares mangled forms).
"""

from __future__ import annotations

import torch

from ...errors import shown
from ..adapter import ModuleSpec
from ..updates import TuckerModule, Update
from .common import (
    AdapterFiles,
    Builder,
    ModuleKey,
    ReadResult,
    Reader,
    check_no_duplicates,
    dora_spec_builder,
    group_by_suffix,
    lora_builder,
    matricize,
    require_pair,
    scalar,
    spec,
    unexpected_key,
)

COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"), ("lycoris_", "model"),
)
LORA_ROLES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".lora_mid.weight": "mid", ".alpha": "alpha",
              ".dora_scale": "magnitude"}

# Identifiers with "_" in the module paths of diffusers (UNet2DConditionModel, SD3/Flux
# transformers) and transformers (CLIP, T5, Llama-style) models.
KNOWN_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks", "conv_in", "conv_out",
    "conv_norm_out", "conv_shortcut", "time_embedding", "time_emb_proj", "linear_1", "linear_2", "proj_in", "proj_out",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
    "norm1_context", "add_embedding", "class_embedding", "encoder_hid_proj", "x_embedder", "context_embedder",
    "time_text_embed", "timestep_embedder", "guidance_embedder", "text_embedder", "proj_mlp", "norm_out", "pos_embed",
    "text_model", "vision_model", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj",
    "up_proj", "down_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection", "token_embedding",
    "position_embedding", "embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "wi_0", "wi_1",
    "relative_attention_bias", "shared_expert", "block_sparse_moe", "c_attn", "c_proj", "c_fc", "query_key_value",
    "dense_h_to_4h", "dense_4h_to_h", "qkv_proj", "gate_up_proj", "fc_1", "fc_2",
)
_WORDS = sorted((tuple(w.split("_")) for w in KNOWN_WORDS), key=len, reverse=True)
NAMES_NOTE = ("kohya/LyCORIS keys write a module's '.' as '_': names restored with a table of module names that "
              "contain '_' (diffusers, transformers); with base weights they are matched against the model exactly")


def split_lora_name(raw: str) -> ModuleKey:
    """(component, module path) of a kohya/LyCORIS lora name (`lora_unet_down_blocks_0_…`)."""
    for prefix, component in COMPONENT_PREFIXES:
        if raw.startswith(prefix) and len(raw) > len(prefix):
            return component, demangle(raw[len(prefix):])
    return None, raw


def demangle(mangled: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` → `down_blocks.0.attentions.0.proj_in`: tokens joined
    back into the longest KNOWN_WORDS, every other "_" a "."."""
    tokens = mangled.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for word in _WORDS:
            if tuple(tokens[i:i + len(word)]) == word:
                parts.append("_".join(word))
                i += len(word)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


class KohyaReader(Reader):
    """kohya / LyCORIS LoCon keys (see the module docstring)."""

    name = "kohya"
    roles: dict[str, str] = LORA_ROLES

    def detect(self, files: AdapterFiles) -> bool:
        return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in files.keys)

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        groups, rest = group_by_suffix(files, files.keys, self.roles)
        if rest:
            raise unexpected_key(files, self.name, rest[0])
        names = {raw: split_lora_name(raw) for raw in groups}
        check_no_duplicates(files, names)
        result = ReadResult(self.name, {})
        for raw, roles in groups.items():
            if set(roles) == {"alpha"}:
                raise files.fail(f"unexpected key {shown(roles['alpha'])!r} in a kohya LoRA file: an alpha without factors")
            component, name = names[raw]
            module_alpha = scalar(files, roles["alpha"]) if "alpha" in roles else None
            result.modules[(component, name)] = self.module_spec(files, raw, component, roles, module_alpha)
            if "diff_b" in roles:  # LyCORIS full: the bias update
                result.extra[f"{component}/{name}.bias" if component else f"{name}.bias"] = roles["diff_b"]
        if any(component is not None for component, _ in result.modules):
            result.notes.append(NAMES_NOTE)
        if any({"mid", "magnitude"} & set(roles) for roles in groups.values()):
            result.format = "lycoris"  # Tucker and DoRA are LyCORIS's, not sd-scripts'
        return result

    def module_spec(self, files: AdapterFiles, raw: str, component: str | None, roles: dict[str, str],
                    alpha: float | None) -> ModuleSpec:
        if not ({"A", "B"} & set(roles)):
            raise unexpected_key(files, self.name, next(iter(roles.values())))
        require_pair(files, raw, roles, label=("lora_down", "lora_up"))
        keys = {role: key for role, key in roles.items() if role != "alpha"}
        build = self._locon_builder(files, raw, component, alpha, "mid" in roles)
        if "magnitude" in roles:
            return spec(keys, dora_spec_builder(files, raw, build, epsilon=lycoris_epsilon, lycoris_layout=True))
        return spec(keys, build)

    def _locon_builder(self, files: AdapterFiles, raw: str, component: str | None, alpha: float | None,
                       tucker: bool) -> Builder:
        def build(tensors: dict[str, torch.Tensor]) -> Update:
            if tucker:
                return tucker_update(files, raw, tensors, alpha, component)
            r = tensors["A"].shape[0]
            return lora_builder(files, raw, rank_alpha(alpha, r), component=component)(tensors)

        return build


def rank_alpha(alpha: float | None, r: int) -> float:
    """kohya's and LyCORIS's rule: α missing or 0 means α = r (s = 1)."""
    return float(r) if not alpha else alpha


def lycoris_epsilon(magnitude: torch.Tensor) -> float:
    """LyCORIS adds the eps of the magnitudes' dtype to the DoRA norms."""
    return float(torch.finfo(magnitude.dtype).eps) if magnitude.is_floating_point() else 0.0


def tucker_update(files: AdapterFiles, raw: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                  component: str | None) -> TuckerModule:
    """LoCon with `use_tucker`: down (r, c_in, 1, 1), mid (r, r, *kernel), up (c_out, r, 1, 1)."""
    down, up, mid = tensors["A"], tensors["B"], tensors["mid"]
    A, B, _ = matricize(files, raw, down, up, label=("lora_down", "lora_up"))
    r = A.shape[0]
    if mid.ndim < 3 or tuple(mid.shape[:2]) != (r, r) or any(n != 1 for n in down.shape[2:]):
        raise files.fail(f"Tucker LoCon module {shown(raw)!r}: lora_down {tuple(down.shape)}, lora_mid {tuple(mid.shape)} "
                         f"and lora_up {tuple(up.shape)} are not (r, c_in, 1, 1), (r, r, kh, kw), (c_out, r, 1, 1)")
    return TuckerModule(alpha=rank_alpha(alpha, r), divisor=float(r), up=B, mid=mid, down=A,
                        kernel=tuple(mid.shape[2:]), component=component)
