"""PEFT adapters (and ours, which PEFT reads): `adapter_model.safetensors` / `.bin` with
`adapter_config.json` beside it, or a lone file whose header carries the config.

Keys `base_model.model.<module>.<role>` (the prefix may be missing in hand-made files):

    LORA     lora_A.weight (r, d_in) · lora_B.weight (d_out, r)  [conv: (r, c_in, kh, kw) / (c_out, r, 1, 1)]
             lora_B.bias (lora_bias: Δbias = s·bias) · lora_magnitude_vector (DoRA, use_dora)
             lora_embedding_A (r, num_embeddings) · lora_embedding_B (dim, r)  (ΔW stored transposed)
             target_parameters: one lora_A (E·r, d_in), lora_B (d_out, r·E) per fused expert parameter
    ADALORA  lora_A (r, d_in) · lora_E (r, 1) · lora_B (d_out, r)     s = α / (ranknum + 1e-5)
    LOHA     hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b                s = alpha / r
    LOKR     lokr_w1 | lokr_w1_a, lokr_w1_b ; lokr_w2 | lokr_w2_a, lokr_w2_b   s = alpha / r

α: `lora_alpha` (LoHa/LoKr: `alpha`), per module through `alpha_pattern`; r through
`rank_pattern` (checked against the tensors). No config: α unknown. Other keys are the
model's own parameters (modules_to_save, an embedding's `base_layer.weight`) → extra tensors;
a key with a `lora_`/`hada_`/`lokr_` part that is no known role is refused.
"""

from __future__ import annotations

import torch

from ...config import LoraConfig, matches_suffix
from ...errors import AdapterFormatError, ModuleResolutionError, shown
from ...fileio import parse_json
from ...naming import resolve_module_name
from ..adapter import ModuleSpec
from ..peft_config import PeftSettings, peft_settings
from ..updates import AdaLoraModule, ExpertsModule, KroneckerFactor, LohaModule, LokrModule, LoraModule, Update
from .common import (
    AdapterFiles,
    ModuleKey,
    ReadResult,
    Reader,
    check_no_duplicates,
    dora_spec_builder,
    group_by_suffix,
    lora_builder,
    matricize,
    require_pair,
    spec,
)

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
HEADER_CONFIG_KEY = "adapter_config"
HEADER_ALPHA_UNKNOWN_KEY = "alpha_unknown"
ROLES: dict[str, dict[str, str]] = {
    "LORA": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias",
             ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
             ".lora_embedding_A": "emb_A", ".lora_embedding_B": "emb_B"},
    "ADALORA": {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"},
    "LOHA": {".hada_w1_a": "w1_a", ".hada_w1_b": "w1_b", ".hada_w2_a": "w2_a", ".hada_w2_b": "w2_b",
             ".hada_t1": "t1", ".hada_t2": "t2"},
    "LOKR": {".lokr_w1": "w1", ".lokr_w1_a": "w1_a", ".lokr_w1_b": "w1_b", ".lokr_w2": "w2",
             ".lokr_w2_a": "w2_a", ".lokr_w2_b": "w2_b", ".lokr_t2": "t2"},
}
ADAPTER_PARTS = ("lora_", "hada_", "lokr_")
KIND_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr"}


class PeftReader(Reader):
    name = "peft"

    def detect(self, files: AdapterFiles) -> bool:
        if HEADER_CONFIG_KEY in files.tensors.metadata:
            return True
        suffixes = tuple(s for roles in ROLES.values() for s in roles if s not in (".lora_A", ".lora_B"))
        return any(k.startswith(PEFT_PREFIX) or k.endswith(suffixes) for k in files.keys)

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        settings, source_format = peft_config(files)
        peft_type = settings.peft_type if settings else _infer_type(files.keys)
        groups, rest = group_by_suffix(files, files.keys, ROLES[peft_type])
        for key in rest:
            if any(part.startswith(ADAPTER_PARTS) for part in key.split(".")):
                raise files.fail(f"unsupported {KIND_NAMES[peft_type]} tensor {shown(key)!r} (not one of "
                                 f"{', '.join(r.lstrip('.') for r in ROLES[peft_type])})")
        names: dict[str, ModuleKey] = {raw: (None, raw.removeprefix(PEFT_PREFIX)) for raw in groups}
        check_no_duplicates(files, names)
        unknown_alpha = set(_header_list(files, HEADER_ALPHA_UNKNOWN_KEY))
        config = settings.config if settings else None
        result = ReadResult(source_format, {}, config=config)
        targets = settings.target_parameters if settings else []
        for raw, roles in groups.items():
            name = names[raw][1]
            module_alpha = alpha if (config is None or name in unknown_alpha) else config.alpha_for(name)
            if targets and (_strip_base_layer(name) != name or _is_parameter_owner(name, targets)):
                continue  # LoRA on parameters: read below, with its nesting
            result.modules[(None, name)] = _module_spec(files, peft_type, settings, name, roles, module_alpha)
        if targets:
            result.modules.update(_parameter_specs(files, settings, groups, names, alpha))
        for key in rest:
            param = key.removeprefix(PEFT_PREFIX)
            result.extra[param.replace(".base_layer.", ".")] = key
        return result


def _infer_type(keys: list[str]) -> str:
    """peft_type of a file without config, from its keys."""
    if any(k.endswith(".lora_E") for k in keys):
        return "ADALORA"
    if any(k.endswith(".hada_w1_a") for k in keys):
        return "LOHA"
    if any(".lokr_w" in k for k in keys):
        return "LOKR"
    return "LORA"


def peft_config(files: AdapterFiles) -> tuple[PeftSettings | None, str]:
    """(settings, source format) of a PEFT-layout file. A directory's `adapter_config.json` is
    what PEFT reads, so it wins there; a lone file describes itself in its header, else the
    `adapter_config.json` beside it counts; else there is no config."""
    from ..files import check_config_matches_weights

    metadata = files.tensors.metadata
    source_format = "ours" if HEADER_CONFIG_KEY in metadata else "peft"
    beside = files.beside(CONFIG_NAME)
    if HEADER_CONFIG_KEY in metadata and not (files.path.is_dir() and beside is not None):
        data, where = parse_json(metadata[HEADER_CONFIG_KEY], files.weights, "header config", AdapterFormatError), files.weights
    elif beside is not None:
        try:
            text = beside.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise AdapterFormatError(beside, f"cannot read: {shown(err)}") from None
        data, where = parse_json(text, beside, "adapter config", AdapterFormatError), beside
        check_config_matches_weights(beside, data, files.weights, metadata)
    else:
        return None, source_format
    return peft_settings(data, where), source_format


def _header_list(files: AdapterFiles, key: str) -> list[str]:
    metadata = files.tensors.metadata
    if key not in metadata:
        return []
    value = parse_json(metadata[key], files.weights, f"header {key!r}", AdapterFormatError)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise files.fail(f"corrupt header: {key!r} must be a list of module names")
    return value


def _module_spec(files: AdapterFiles, peft_type: str, settings: PeftSettings | None, name: str,
                 roles: dict[str, str], alpha: float | None) -> ModuleSpec:
    config = settings.config if settings else None
    if peft_type == "LORA":
        return _lora_spec(files, settings, name, roles, alpha)
    if peft_type == "ADALORA":
        return _adalora_spec(files, settings, name, roles, alpha)
    divisor_check = config.rank_for(name) if config else None
    if peft_type == "LOHA":
        return _loha_spec(files, name, roles, alpha, divisor_check)
    return _lokr_spec(files, name, roles, alpha, divisor_check)


def _check_rank(files: AdapterFiles, config: LoraConfig | None, name: str, r: int) -> None:
    if config is not None and config.rank_for(name) != r:
        raise files.fail(f"config gives module {shown(name)!r} rank {config.rank_for(name)}, its factors have rank {r}")


def _lora_spec(files: AdapterFiles, settings: PeftSettings | None, name: str, roles: dict[str, str],
               alpha: float | None) -> ModuleSpec:
    config = settings.config if settings else None
    embedding = "emb_A" in roles or "emb_B" in roles
    a, b = ("emb_A", "emb_B") if embedding else ("A", "B")
    require_pair(files, name, roles, a, b, ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B"))
    if embedding and ("A" in roles or "B" in roles):
        raise files.fail(f"module {shown(name)!r} has both lora_A/lora_B and lora_embedding_A/B")
    keys = {"A": roles[a], "B": roles[b]}
    use_dora = settings.use_dora if settings else "magnitude" in roles
    if use_dora and "magnitude" not in roles:
        raise files.fail(f"config says use_dora, but module {shown(name)!r} has no lora_magnitude_vector (DoRA magnitude)")
    if "magnitude" in roles and not use_dora:
        raise files.fail(f"module {shown(name)!r} has a DoRA lora_magnitude_vector, but its config does not set use_dora")
    if use_dora and embedding:
        raise files.fail(f"module {shown(name)!r}: DoRA on an embedding is not read")
    fan_in_fan_out = bool(config and config.fan_in_fan_out)
    direction = lora_builder(files, name, alpha, use_rslora=bool(config and config.use_rslora),
                             fan_in_fan_out=fan_in_fan_out, transposed=True if embedding else False)

    def build(tensors: dict[str, torch.Tensor]) -> Update:
        update = direction(tensors)
        _check_rank(files, config, name, update.r or 0)
        if "B_bias" in tensors:
            if tuple(tensors["B_bias"].shape) != (update.shape[0],):
                raise files.fail(f"lora_B.bias of module {shown(name)!r} has shape {tuple(tensors['B_bias'].shape)}, "
                                 f"expected ({update.shape[0]},)")
            assert isinstance(update, LoraModule)
            update.bias = tensors["B_bias"]
        return update

    if "B_bias" in roles:
        keys["B_bias"] = roles["B_bias"]
    if use_dora:
        keys["magnitude"] = roles["magnitude"]
        return spec(keys, dora_spec_builder(files, name, build))
    return spec(keys, build)


def _adalora_spec(files: AdapterFiles, settings: PeftSettings | None, name: str, roles: dict[str, str],
                  alpha: float | None) -> ModuleSpec:
    require_pair(files, name, roles)
    if "E" not in roles:
        raise files.fail(f"AdaLoRA module {shown(name)!r} has no lora_E")
    init_r = settings.init_r if settings else None
    mask = _rank_mask(settings, name) if settings else None

    def build(tensors: dict[str, torch.Tensor]) -> Update:
        A, B, _ = matricize(files, name, tensors["A"], tensors["B"], allow_empty=True)
        E = tensors["E"]
        r = A.shape[0]
        if tuple(E.shape) not in ((r, 1), (r,)):
            raise files.fail(f"lora_E of AdaLoRA module {shown(name)!r} has shape {tuple(E.shape)}, expected ({r}, 1)")
        if mask is not None and sum(mask) != r:
            raise files.fail(f"AdaLoRA rank_pattern keeps {sum(mask)} ranks of module {shown(name)!r}, its factors have {r}")
        if mask is None and init_r is not None and r != init_r:
            raise files.fail(f"AdaLoRA module {shown(name)!r} has rank {r}, init_r is {init_r} and no rank_pattern entry")
        # PEFT builds the layer with init_r, keeps that ranknum when pruning to r > 0, and
        # rebuilds a layer pruned to rank 0 with ranknum 0 (its ΔW = 0 anyway).
        ranknum = float(init_r if r > 0 else 0) if init_r is not None else 0.0
        module_alpha = alpha
        if alpha is not None and alpha == 0 and init_r is not None:
            module_alpha = float(init_r)  # PEFT: scaling = lora_alpha if lora_alpha > 0 else r
        return AdaLoraModule(A=A, B=B, alpha=module_alpha if init_r is not None else None,
                             fan_in_fan_out=bool(settings and settings.config.fan_in_fan_out),
                             E=E.reshape(-1), ranknum=ranknum)

    return spec({"A": roles["A"], "B": roles["B"], "E": roles["E"]}, build)


def _rank_mask(settings: PeftSettings, name: str) -> list[bool] | None:
    """The AdaLoRA rank mask of a module (`rank_pattern` key `<module>.lora_E[.<adapter>]`)."""
    for key, mask in settings.rank_masks.items():
        module = key.rsplit(".lora_E", 1)[0] if ".lora_E" in key else key
        if module == name or module.removeprefix(PEFT_PREFIX) == name:
            return mask
    return None


def _loha_spec(files: AdapterFiles, name: str, roles: dict[str, str], alpha: float | None,
               config_rank: int | None) -> ModuleSpec:
    if "t1" in roles or "t2" in roles:
        raise files.fail(f"LoHa module {shown(name)!r} has Tucker cores (hada_t1/hada_t2, use_effective_conv2d), which are not read")
    missing = [f"hada_{r}" for r in ("w1_a", "w1_b", "w2_a", "w2_b") if r not in roles]
    if missing:
        raise files.fail(f"LoHa module {shown(name)!r} lacks {', '.join(missing)}")

    def build(tensors: dict[str, torch.Tensor]) -> Update:
        return loha_update(files, name, tensors, alpha, config_rank)

    return spec({r: roles[r] for r in ("w1_a", "w1_b", "w2_a", "w2_b")}, build)


def loha_update(files: AdapterFiles, name: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                config_rank: int | None, component: str | None = None) -> LohaModule:
    """LoHa from hada_w1_a (d_out, r), hada_w1_b (r, d_in…), hada_w2_a, hada_w2_b; s = α/r."""
    w1_a, w1_b, w2_a, w2_b = (tensors[r] for r in ("w1_a", "w1_b", "w2_a", "w2_b"))
    w1_b, w2_b = w1_b.reshape(w1_b.shape[0], -1), w2_b.reshape(w2_b.shape[0], -1)
    shapes = [tuple(t.shape) for t in (w1_a, w1_b, w2_a, w2_b)]
    if any(len(s) != 2 for s in shapes) or w1_a.shape[1] != w1_b.shape[0] or w2_a.shape[1] != w2_b.shape[0] \
            or w1_a.shape[0] != w2_a.shape[0] or w1_b.shape[1] != w2_b.shape[1]:
        raise files.fail(f"LoHa module {shown(name)!r} has factors of shapes {shapes} that do not multiply to one ΔW")
    r = w1_b.shape[0]
    if config_rank is not None and config_rank != r:
        raise files.fail(f"config gives module {shown(name)!r} rank {config_rank}, its factors have rank {r}")
    return LohaModule(alpha=alpha, divisor=float(r), w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, component=component)


def _lokr_spec(files: AdapterFiles, name: str, roles: dict[str, str], alpha: float | None,
               config_rank: int | None) -> ModuleSpec:
    check_lokr_roles(files, name, roles)

    def build(tensors: dict[str, torch.Tensor]) -> Update:
        update = lokr_update(files, name, tensors, alpha, config_rank)
        if config_rank is not None and update.r is not None and update.r != config_rank:
            raise files.fail(f"config gives module {shown(name)!r} rank {config_rank}, its factors have rank {update.r}")
        return update

    return spec(dict(roles), build)


def check_lokr_roles(files: AdapterFiles, name: str, roles: dict[str, str]) -> None:
    if "t2" in roles:
        raise files.fail(f"LoKr module {shown(name)!r} has a Tucker core (lokr_t2), which is not read")
    for side in ("w1", "w2"):
        full, pair = side in roles, (f"{side}_a" in roles, f"{side}_b" in roles)
        if full == any(pair) or (any(pair) and not all(pair)):
            raise files.fail(f"LoKr module {shown(name)!r} needs lokr_{side}, or lokr_{side}_a and lokr_{side}_b")


def lokr_update(files: AdapterFiles, name: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                divisor_rank: int | None, *, alpha_ignored_when_full: bool = False,
                component: str | None = None) -> LokrModule:
    """LoKr from its roles: w = w or w_a @ w_b per side; w2 of a conv is (b, d, kh, kw) when full
    (flattened per row), (b, d·kh·kw) when factored. s = α / r with r the factored side's rank
    (PEFT: the config's r); `alpha_ignored_when_full` (LyCORIS): s = 1 when both sides are full."""
    sides = []
    kernel: tuple[int, ...] | None = None
    for side in ("w1", "w2"):
        if side in tensors:
            full = tensors[side]
            if side == "w2" and full.ndim > 2:
                kernel = tuple(full.shape[2:])
            if full.ndim < 2 or (side == "w1" and full.ndim != 2):
                raise files.fail(f"lokr_{side} of module {shown(name)!r} has shape {tuple(full.shape)}")
            sides.append(KroneckerFactor(full=full.reshape(full.shape[0], -1)))
        else:
            a, b = tensors[f"{side}_a"], tensors[f"{side}_b"]
            b = b.reshape(b.shape[0], -1)
            if a.ndim != 2 or a.shape[1] != b.shape[0]:
                raise files.fail(f"lokr_{side}_a {tuple(a.shape)} and lokr_{side}_b {tuple(b.shape)} of module "
                                 f"{shown(name)!r} do not multiply")
            sides.append(KroneckerFactor(a=a, b=b))
    w1, w2 = sides
    both_full = w1.full is not None and w2.full is not None
    rank = w1.rank if w1.rank is not None else w2.rank
    divisor = rank if rank is not None else divisor_rank
    ignored = alpha_ignored_when_full and both_full
    if divisor is None and not ignored:
        raise files.fail(f"LoKr module {shown(name)!r} has two full factors and no rank to scale α by")
    return LokrModule(alpha=alpha, divisor=float(divisor or 1), w1=w1, w2=w2, alpha_ignored=ignored,
                      config_rank=divisor_rank, kernel=kernel, component=component)


# ---------------------------------------------------------------------------- target_parameters


def _strip_base_layer(name: str) -> str:
    return name.replace(".base_layer", "")


def _owner_targets(owner: str, targets: list[str]) -> list[str]:
    """Parameter names targeted on module `owner`, in target_parameters order."""
    found = []
    for target in targets:
        module, _, param = target.rpartition(".")
        if module and matches_suffix(owner, [module]) and param not in found:
            found.append(param)
    return found


def _is_parameter_owner(name: str, targets: list[str]) -> bool:
    return bool(_owner_targets(name, targets))


def _parameter_specs(files: AdapterFiles, settings: PeftSettings | None, groups: dict[str, dict[str, str]],
                     names: dict[str, ModuleKey], alpha: float | None) -> dict[ModuleKey, ModuleSpec]:
    """LoRA on parameters (PEFT `target_parameters`): PEFT nests one wrapper per parameter of a
    module, the first-wrapped innermost (`….base_layer.lora_A.weight`). Which wrapper holds which
    parameter follows the model's parameter order, which the file does not record: with one
    parameter per module there is no question; with several, the base weights' shapes decide
    (passed as `weight_shapes`), else the file is refused."""
    assert settings is not None
    config = settings.config
    owners: dict[str, dict[int, tuple[str, dict[str, str]]]] = {}
    for raw, roles in groups.items():
        name = names[raw][1]
        owner = _strip_base_layer(name)
        if owner == name and not _is_parameter_owner(name, settings.target_parameters):
            continue
        depth = name.count(".base_layer")
        owners.setdefault(owner, {})[depth] = (name, roles)
    specs: dict[ModuleKey, ModuleSpec] = {}
    for owner, wrappers in owners.items():
        params = _owner_targets(owner, settings.target_parameters)
        if len(params) != len(wrappers) or sorted(wrappers) != list(range(len(wrappers))):
            raise files.fail(f"module {shown(owner)!r} has {len(wrappers)} LoRA wrappers, target_parameters names "
                             f"{len(params)} of its parameters: cannot tell which is which")
        assignment = _assign_parameters(files, owner, params, wrappers)
        for depth, (name, roles) in wrappers.items():
            param = f"{owner}.{assignment[depth]}"
            specs[(None, param)] = _experts_spec(files, config, param, roles, config.alpha_for(param))
    return specs


def _assign_parameters(files: AdapterFiles, owner: str, params: list[str],
                       wrappers: dict[int, tuple[str, dict[str, str]]]) -> dict[int, str]:
    if len(params) == 1:
        return {0: params[0]}
    shapes = files.weight_shapes
    if not shapes:
        raise files.fail(f"module {shown(owner)!r} has LoRA on {len(params)} parameters ({', '.join(params)}): PEFT "
                         "nests them in the model's parameter order, which the file does not record; pass the base "
                         "weights to tell them apart by shape")
    factor_shapes = {depth: (files.tensors.shape(roles["B"])[0], files.tensors.shape(roles["A"])[1])
                     for depth, (_, roles) in wrappers.items()}
    assignment = {}
    for param in params:
        try:
            key = resolve_module_name(f"{owner}.{param}", list(shapes), "base weights")
        except ModuleResolutionError as err:
            raise files.fail(f"target parameter {owner}.{param}: {err}") from None
        stored = shapes[key]
        fits = [d for d, (out, inp) in factor_shapes.items() if tuple(stored[-2:]) in ((out, inp), (inp, out))]
        if len(fits) != 1:
            raise files.fail(f"parameter {shown(key)!r} of shape {tuple(stored)} fits {len(fits)} of the LoRA "
                             f"wrappers of {shown(owner)!r}: cannot tell which is which")
        assignment[fits[0]] = param
    if len(assignment) != len(params):
        raise files.fail(f"the LoRA wrappers of {shown(owner)!r} cannot be matched to its parameters one to one")
    return assignment


def _experts_spec(files: AdapterFiles, config: LoraConfig, param: str, roles: dict[str, str],
                  alpha: float | None) -> ModuleSpec:
    """A (E·r, d_in): expert-major rows; B (d_out, r·E): expert index fastest in the columns."""
    require_pair(files, param, roles)
    r = config.rank_for(param)

    def build(tensors: dict[str, torch.Tensor]) -> Update:
        A, B = tensors["A"], tensors["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] % r or B.shape[1] != A.shape[0]:
            raise files.fail(f"LoRA of parameter {shown(param)!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                             f"are not (E·{r}, d_in) and (d_out, {r}·E)")
        E = A.shape[0] // r
        A_e = A.reshape(E, r, A.shape[1])
        B_e = B.reshape(B.shape[0], r, E)
        experts = [LoraModule(A=A_e[e], B=B_e[:, :, e], alpha=alpha, use_rslora=config.use_rslora) for e in range(E)]
        return experts[0] if E == 1 else ExpertsModule(experts)

    return spec({"A": roles["A"], "B": roles["B"]}, build)

