"""diffusers LoRA files (`pytorch_lora_weights.safetensors`), in the layouts diffusers writes.

Keys start with the pipeline component (`unet.`, `text_encoder.`, `text_encoder_2.`,
`transformer.`, ...; diffusers 0.21–0.24's training scripts doubled it: `unet.unet.`):

    diffusers' own (convert_state_dict_to_diffusers, LoRACompatible layers, ≤ 0.24):
        <path>.lora.down.weight (A) · <path>.lora.up.weight (B)            unet attention, convs
        <path>.lora_linear_layer.down.weight · .up.weight                   text encoder projections
        <path>.processor.to_q_lora.down.weight (≤ 0.20, save_attn_procs; to_out_lora → to_out.0)
    PEFT keys with the component prefix (save_lora_weights with the PEFT backend):
        <component>.<path>.lora_A.weight · .lora_B.weight [· .lora_magnitude_vector]
    PEFT keys without prefix (a model's save_lora_adapter), with `lora_adapter_metadata`.

α: the safetensors header's `lora_adapter_metadata` (JSON: each component's LoraConfig,
flattened as `transformer.lora_alpha`, `text_encoder.alpha_pattern`, ... or unprefixed for one
model), per module through alpha_pattern / rank_pattern; `<path>.alpha` keys (network alphas)
where present. Otherwise α is unknown (diffusers itself then loads with α = r).

A file mixing diffusers' `lora.down` keys with PEFT `lora_A` keys is refused: diffusers' own
loader silently ignores the former in such files, so the tool's ΔW is not what the file holds.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import LoraConfig
from ...errors import AdapterFormatError, shown
from ...fileio import parse_json
from ..peft_config import peft_settings
from ..adapter import ModuleSpec
from ..updates import LoraModule, Update
from .common import (
    AdapterFiles,
    ReadResult,
    Reader,
    check_no_duplicates,
    dora_spec_builder,
    group_by_suffix,
    lora_builder,
    require_pair,
    scalar,
    spec,
    unexpected_key,
)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior", "decoder")
METADATA_KEY = "lora_adapter_metadata"
OWN_ROLES = {".lora.down.weight": "A", ".lora.up.weight": "B", ".lora_linear_layer.down.weight": "A",
             ".lora_linear_layer.up.weight": "B", ".alpha": "alpha"}
PEFT_ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude", ".alpha": "alpha"}
PROCESSOR_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
                         "add_k_proj": "add_k_proj", "add_v_proj": "add_v_proj"}


def split_component(key: str) -> tuple[str | None, str]:
    """(component, rest) of a key: `unet.unet.x` (diffusers 0.24's doubled prefix) → ("unet", "x")."""
    head, _, rest = key.partition(".")
    if head not in COMPONENTS or not rest:
        return None, key
    if rest.startswith(head + "."):
        rest = rest[len(head) + 1:]
    return head, rest


def _processor_key(key: str) -> str:
    """`…attn1.processor.to_q_lora.down.weight` → `…attn1.to_q.lora.down.weight` (≤ 0.20 layout)."""
    before, _, after = key.partition(".processor.")
    projection, _, role = after.partition("_lora.")
    if projection not in PROCESSOR_PROJECTIONS or role not in ("down.weight", "up.weight"):
        return key
    return f"{before}.{PROCESSOR_PROJECTIONS[projection]}.lora.{role}"


class DiffusersReader(Reader):
    name = "diffusers"

    def detect(self, files: AdapterFiles) -> bool:
        if any(k.endswith((".lora.down.weight", ".lora.up.weight")) or ".lora_linear_layer." in k
               or ".processor." in k for k in files.keys):
            return True
        if METADATA_KEY in files.tensors.metadata:
            return True
        has_config = "adapter_config" in files.tensors.metadata or files.beside("adapter_config.json") is not None
        return not has_config and any(split_component(k)[0] and k.endswith((".lora_A.weight", ".lora_B.weight"))
                                      for k in files.keys)

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        renamed = {_processor_key(k) if ".processor." in k else k: k for k in files.keys}
        own = [k for k in renamed if k.endswith(tuple(r for r in OWN_ROLES if r != ".alpha"))]
        peft = [k for k in renamed if k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if own and peft:
            raise files.fail(f"mixes diffusers' 'lora.down' keys ({shown(own[0])!r}) with PEFT 'lora_A' keys "
                             f"({shown(peft[0])!r}): diffusers' own loader ignores the former in such files")
        groups, rest = group_by_suffix(files, renamed, OWN_ROLES if own else PEFT_ROLES)
        if rest:
            raise unexpected_key(files, self.name, renamed[rest[0]])
        names = {raw: split_component(raw) for raw in groups}
        check_no_duplicates(files, names)
        configs = self._configs(files)
        result = ReadResult(self.name, {})
        for raw, roles in groups.items():
            roles = {role: renamed[key] for role, key in roles.items()}
            component, name = names[raw]
            config = configs.get(component) if component in configs else configs.get(None)
            if "alpha" in roles:
                module_alpha: float | None = scalar(files, roles.pop("alpha"))
            elif config is not None:
                module_alpha = config.alpha_for(name)
            else:
                module_alpha = alpha
            result.modules[(component, name)] = self._spec(files, raw, component, name, roles, module_alpha, config)
        return result

    def _spec(self, files: AdapterFiles, raw: str, component: str | None, name: str, roles: dict[str, str],
              alpha: float | None, config: LoraConfig | None) -> ModuleSpec:
        require_pair(files, raw, roles)
        direction = lora_builder(files, raw, alpha, use_rslora=bool(config and config.use_rslora), component=component)

        def build(tensors: dict[str, torch.Tensor]) -> Update:
            update = direction(tensors)
            assert isinstance(update, LoraModule)
            if config is not None and config.rank_for(name) != update.r:
                raise files.fail(f"lora_adapter_metadata gives module {shown(raw)!r} rank {config.rank_for(name)}, "
                                 f"its factors have rank {update.r}")
            return update

        if "magnitude" in roles:
            return spec(roles, dora_spec_builder(files, raw, build))
        return spec(roles, build)

    def _configs(self, files: AdapterFiles) -> dict[str | None, LoraConfig]:
        """{component (None: unprefixed): LoraConfig} from the header's lora_adapter_metadata."""
        text = files.tensors.metadata.get(METADATA_KEY)
        if text is None:
            return {}
        data = parse_json(text, files.weights, f"header {METADATA_KEY!r}", AdapterFormatError)
        if not isinstance(data, dict):
            raise files.fail(f"corrupt header: {METADATA_KEY!r} must be a JSON object")
        per_component: dict[str | None, dict[str, Any]] = {}
        for key, value in data.items():
            head, _, field_name = key.partition(".")
            if head in COMPONENTS and field_name:
                per_component.setdefault(head, {})[field_name] = value
            else:
                per_component.setdefault(None, {})[key] = value
        return {component: peft_settings(fields, files.weights).config for component, fields in per_component.items()}

