"""What a module path says: the same module under other prefixes, its layer, its projection.

Adapters name modules as the model they were trained on did (`bert.encoder.layer.0...` for a
classification model, `encoder.layer.0...` for a bare encoder, `base_model.model.` from PEFT,
`model.` in many decoder checkpoints). `resolve_module_name` finds the one candidate that
names the same module, or fails listing the closest candidates.

Layer and projection come from the path alone, with "." (PEFT, ours) or "_" (kohya) as
separators::

    bert.encoder.layer.3.attention.self.query              layer ("bert.encoder.layer", 3), "q"
    transformer.h.0.attn.c_attn                            layer ("transformer.h", 0), "qkv"
    model.layers.3.block_sparse_moe.experts.7.w1           layer ("model.layers", 3), "mlp.gate"
    encoder.block.3.layer.0.SelfAttention.q                layer ("encoder.block", 3), "q"
    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q   layer ("down_blocks", 1), "q"

The layer is the FIRST integer component: later integers number parts inside a layer (MoE
experts, T5's sub-layers, diffusers' blocks within a stage), and the part before it names the
stack (`encoder`, `decoder`, ...), so models with several stacks keep their layers apart.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable

from .errors import ModuleResolutionError

KNOWN_PREFIXES = ("base_model.model.", "bert.", "roberta.", "model.", "transformer.")


def strip_known_prefixes(name: str) -> str:
    """Remove a pipeline component (`unet/`, as adapters of several components name their
    modules) and leading wrapper prefixes (`base_model.model.`, `bert.`, ...) repeatedly."""
    name = name.rpartition("/")[2]
    changed = True
    while changed:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def resolve_module_name(name: str, candidates: Iterable[str], what: str = "model") -> str:
    """The candidate naming the same module as `name`.

    Exact match first; then equality after stripping known prefixes on both sides; then, for
    names read from kohya keys (which write every "." as "_"), equality with "." and "_" not
    told apart. Raises `ModuleResolutionError` (listing the closest candidates) when nothing
    or several match.
    """
    candidates = list(candidates)
    if name in candidates:
        return name
    key = strip_known_prefixes(name)
    matches = [c for c in candidates if strip_known_prefixes(c) == key]
    if not matches:
        mangled = key.replace(".", "_")
        matches = [c for c in candidates if strip_known_prefixes(c).replace(".", "_") == mangled]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ModuleResolutionError(f"module {name!r} is ambiguous in the {what}: matches {matches[:5]}")
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.0) if candidates else []
    raise ModuleResolutionError(f"module {name!r} not found in the {what}; closest: {close}")


_SEP = r"(?:^|[._])"

# Ordered: the first pattern that matches the end of the path wins ("attention.output.dense"
# before "output.dense", "attn.c_proj" before "mlp.c_proj", a MoE router's bare "gate" before
# the experts' "gate_proj"/"w1").
_PROJECTION_PATTERNS: list[tuple[str, str]] = [
    ("qkv", r"c_attn|query_key_value|qkv|qkv_proj|Wqkv|in_proj"),
    ("q", r"q_proj|query|q|wq|to_q|q_lin"),
    ("k", r"k_proj|key|k|wk|to_k|k_lin"),
    ("v", r"v_proj|value|v|wv|to_v|v_lin"),
    ("o", r"o_proj|out_proj|o|attention[._]output[._]dense|attn[._]c_proj|to_out[._]0|out_lin"
          r"|self_attention[._]dense|attn[._]dense|attention[._]wo"),
    ("router", r"router|gate"),
    ("mlp.gate", r"gate_proj|w1"),
    ("mlp.up", r"up_proj|intermediate[._]dense|c_fc|fc1|dense_h_to_4h|wi|wi_0|wi_1|lin1|w3|fc_in"
               r"|ff[._]net[._]0[._]proj"),
    ("mlp.down", r"down_proj|output[._]dense|mlp[._]c_proj|fc2|dense_4h_to_h|wo|lin2|w2|fc_out|ff[._]net[._]2"),
]
PROJECTION_ORDER = ("q", "k", "v", "qkv", "o", "router", "mlp.gate", "mlp.up", "mlp.down")
_PROJECTION_RES = [(label, re.compile(f"{_SEP}(?:{alts})$")) for label, alts in _PROJECTION_PATTERNS]
_INTEGER = re.compile(r"(?:^|[._])(\d+)(?=[._]|$)")


def projection_type(name: str) -> str:
    """Canonical projection label (q, k, v, qkv, o, router, mlp.gate, mlp.up, mlp.down), else
    the path's last component."""
    for label, pattern in _PROJECTION_RES:
        if pattern.search(name):
            return label
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack, index) from the first integer component of the path, or None if it has none.

    `bert.encoder.layer.3.attention.self.query` → ("bert.encoder.layer", 3).
    """
    match = _INTEGER.search(name)
    if match is None:
        return None
    return name[: match.start(1)].rstrip("._"), int(match.group(1))


def layer_pattern(name: str) -> str | None:
    """The path with its layer index (see `layer_of`) replaced by `*`: the same module in every
    layer (`model.layers.*.block_sparse_moe.experts.7.w1`); None outside numbered layers."""
    match = _INTEGER.search(name)
    if match is None:
        return None
    return f"{name[: match.start(1)]}*{name[match.end(1):]}"
