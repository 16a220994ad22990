"""Order and label modules for reports, from the module path alone (layer and projection
type come from `naming.layer_of` / `naming.projection_type`)."""

from __future__ import annotations

from ..naming import PROJECTION_ORDER, layer_of, projection_type


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
