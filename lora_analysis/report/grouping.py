"""Group modules by layer and by projection type, from the module path alone.

    bert.encoder.layer.3.attention.self.query  ->  layer 3, projection "q"
    transformer.h.0.attn.c_attn                ->  layer 0, projection "qkv"
    model.layers.7.mlp.down_proj               ->  layer 7, projection "mlp.down"

Paths may use "." (PEFT, ours) or "_" (kohya) as separators. The layer is the first integer
component; the part before it names the stack (`encoder`, `decoder`, ...), so models with
several stacks keep their layers apart.
"""

from __future__ import annotations

import re

_SEP = r"(?:^|[._])"

# Ordered: the first pattern that matches the end of the path wins ("attention.output.dense"
# before "output.dense", "attn.c_proj" before "mlp.c_proj").
_PROJECTION_PATTERNS: list[tuple[str, str]] = [
    ("qkv", r"c_attn|query_key_value|qkv|qkv_proj|Wqkv|in_proj"),
    ("q", r"q_proj|query|q|wq|to_q|q_lin"),
    ("k", r"k_proj|key|k|wk|to_k|k_lin"),
    ("v", r"v_proj|value|v|wv|to_v|v_lin"),
    ("o", r"o_proj|out_proj|o|attention[._]output[._]dense|attn[._]c_proj|to_out[._]0|out_lin"
          r"|self_attention[._]dense|attn[._]dense|attention[._]wo"),
    ("mlp.gate", r"gate_proj|w1|gate"),
    ("mlp.up", r"up_proj|intermediate[._]dense|c_fc|fc1|dense_h_to_4h|wi|wi_0|wi_1|lin1|w3|fc_in"),
    ("mlp.down", r"down_proj|output[._]dense|mlp[._]c_proj|fc2|dense_4h_to_h|wo|lin2|w2|fc_out"),
]
PROJECTION_ORDER = ("q", "k", "v", "qkv", "o", "mlp.gate", "mlp.up", "mlp.down")
_PROJECTION_RES = [(label, re.compile(f"{_SEP}(?:{alts})$")) for label, alts in _PROJECTION_PATTERNS]
_INTEGER = re.compile(r"(?:^|[._])(\d+)(?=[._]|$)")


def projection_type(name: str) -> str:
    """Canonical projection label (q, k, v, qkv, o, mlp.gate, mlp.up, mlp.down), else the
    path's last component."""
    for label, pattern in _PROJECTION_RES:
        if pattern.search(name):
            return label
    return re.split(r"[.]", name)[-1]


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack, index) from the first integer component of the path, or None if it has none.

    `bert.encoder.layer.3.attention.self.query` -> ("bert.encoder.layer", 3).
    """
    match = _INTEGER.search(name)
    if match is None:
        return None
    return name[: match.start(1)].rstrip("._"), int(match.group(1))


def model_order(name: str) -> tuple:
    """Sort key putting modules in model order: by stack and layer index (numerically, so
    layer 2 before layer 10; modules outside numbered layers last), then projection type in
    PROJECTION_ORDER (others after), then the path."""
    layer = layer_of(name)
    projection = projection_type(name)
    rank = PROJECTION_ORDER.index(projection) if projection in PROJECTION_ORDER else len(PROJECTION_ORDER)
    return (1, "", 0) if layer is None else (0, *layer), rank, name


def layer_labels(names: list[str]) -> dict[str, str | None]:
    """Display label of each module's layer: the index alone when every module lies in one
    stack, else `stack.index`; None for modules outside any numbered layer."""
    layers = {name: layer_of(name) for name in names}
    stacks = {layer[0] for layer in layers.values() if layer is not None}
    single = len(stacks) <= 1
    return {
        name: None if layer is None else (str(layer[1]) if single else f"{layer[0]}.{layer[1]}")
        for name, layer in layers.items()
    }


def common_prefix(names: list[str]) -> str:
    """Longest common prefix ending at a "." that leaves every name non-empty, for shortening
    long module paths in tables and figure titles; "" when shorter than 8 characters."""
    if len(names) < 2:
        return ""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix if len(prefix) >= 8 and all(len(n) > len(prefix) for n in names) else ""
