"""torchtune's own adapter checkpoint: `adapter_model.pt`, a flat dict in torchtune's module
names (`layers.0.attn.q_proj`, `layers.0.mlp.w1`, `output`), with the PEFT-format
`adapter_config.json` its checkpointer writes beside it (the source of α).

    <module>.lora_a.weight (r, d_in) · <module>.lora_b.weight (d_out, r) · <module>.magnitude (DoRA, (d_out,))

α: `lora_alpha` of adapter_config.json (one r and α for every module; torchtune writes no
patterns, and its `target_modules` are Hugging Face names, so patterns could not apply);
without it α is unknown.
"""

from __future__ import annotations

import torch

from ...errors import shown
from ..updates import Update
from .common import (
    AdapterFiles,
    Builder,
    ReadResult,
    Reader,
    dora_spec_builder,
    group_by_suffix,
    lora_builder,
    require_pair,
    spec,
    unexpected_key,
)
from .peft import CONFIG_NAME

ROLES = {".lora_a.weight": "A", ".lora_b.weight": "B", ".magnitude": "magnitude"}


class TorchtuneReader(Reader):
    name = "torchtune"

    def detect(self, files: AdapterFiles) -> bool:
        return any(k.endswith((".lora_a.weight", ".lora_b.weight")) for k in files.keys)

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        groups, rest = group_by_suffix(files, files.keys, ROLES)
        if rest:
            raise unexpected_key(files, self.name, rest[0])
        r, module_alpha = self._config(files)
        result = ReadResult(self.name, {})
        for name, roles in groups.items():
            require_pair(files, name, roles, label=("lora_a", "lora_b"))
            direction = lora_builder(files, name, alpha if module_alpha is None else module_alpha)

            def build(tensors: dict[str, torch.Tensor], name: str = name, direction: Builder = direction) -> Update:
                update = direction(tensors)
                if r is not None and update.r != r:
                    raise files.fail(f"adapter_config.json gives rank {r}, module {shown(name)!r} has rank {update.r}")
                return update

            keys = dict(roles)
            result.modules[(None, name)] = spec(keys, dora_spec_builder(files, name, build) if "magnitude" in roles else build)
        return result

    def _config(self, files: AdapterFiles) -> tuple[int | None, float | None]:
        found = files.json_beside(CONFIG_NAME, "adapter config")
        if found is None:
            return None, None
        data, path = found
        from ..peft_config import peft_settings

        settings = peft_settings(data, path)
        if settings.config.rank_pattern or settings.config.alpha_pattern:
            raise files.fail(f"{CONFIG_NAME} beside a torchtune checkpoint has rank/alpha patterns, which cannot name "
                             "torchtune's modules")
        return settings.config.r, settings.config.lora_alpha
