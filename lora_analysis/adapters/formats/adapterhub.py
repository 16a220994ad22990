"""AdapterHub (`adapters` library) LoRA: a directory with `adapter_config.json` and
`pytorch_adapter.bin` (or `model.safetensors` with `use_safetensors=True`).

    <module>.loras.<adapter name>.lora_A (r, d_in) · .lora_B (d_out, r)      ΔW = (α / r) · B·A

α and r: `config.alpha`, `config.r` of adapter_config.json. Only `architecture: "lora"` with
`composition_mode: "add"` is read; gated LoRA (`use_gating`, whose ΔW depends on the input),
`"scale"` composition (IA³-like) and AdapterHub's DoRA are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import shown
from ..updates import Update
from .common import AdapterFiles, Builder, ReadResult, Reader, group_by_suffix, lora_builder, require_pair, spec, unexpected_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("pytorch_adapter.bin", "model.safetensors")


class AdapterhubReader(Reader):
    name = "adapterhub"

    def detect(self, files: AdapterFiles) -> bool:
        if any(".loras." in k for k in files.keys):
            return True
        found = files.json_beside(CONFIG_NAME, "adapter config")
        return found is not None and isinstance(found[0], dict) and isinstance(found[0].get("config"), dict) \
            and "architecture" in found[0]["config"]

    def read(self, files: AdapterFiles, alpha: float | None) -> ReadResult:
        config, adapter_name = self._config(files)
        r, config_alpha = config.get("r"), config.get("alpha")
        groups, rest = group_by_suffix(files, files.keys, {".lora_A": "A", ".lora_B": "B"})
        if rest:
            raise unexpected_key(files, "AdapterHub", rest[0])
        result = ReadResult(self.name, {})
        for raw, roles in groups.items():
            module, marker, name = raw.rpartition(".loras.")
            if not marker or (adapter_name is not None and name != adapter_name):
                raise files.fail(f"key {shown(raw)!r} is not '<module>.loras.{adapter_name or '<adapter>'}.lora_A/B'")
            require_pair(files, module, roles)
            module_alpha = float(config_alpha) if config_alpha is not None else alpha
            build = lora_builder(files, module, module_alpha)

            def checked(tensors: dict[str, torch.Tensor], build: Builder = build, module: str = module) -> Update:
                update = build(tensors)
                if r is not None and update.r != r:
                    raise files.fail(f"adapter_config.json gives r = {r}, module {shown(module)!r} has rank {update.r}")
                return update

            result.modules[(None, module)] = spec(dict(roles), checked)
        return result

    def _config(self, files: AdapterFiles) -> tuple[dict[str, Any], str | None]:
        found = files.json_beside(CONFIG_NAME, "adapter config")
        if found is None:
            return {}, None
        data, path = found
        config = data.get("config") if isinstance(data, dict) else None
        if not isinstance(config, dict):
            raise files.fail(f"{path.name}: expected AdapterHub's {{'config': {{...}}, 'name': ...}}")
        problems = {
            "architecture": (config.get("architecture") != "lora", "only 'lora' adapters are read"),
            "composition_mode": (config.get("composition_mode", "add") != "add", "only 'add' composition is read"),
            "use_gating": (bool(config.get("use_gating")), "gated LoRA's ΔW depends on the input"),
            "use_dora": (bool(config.get("use_dora")), "AdapterHub DoRA is not read"),
        }
        for field_name, (bad, why) in problems.items():
            if bad:
                raise files.fail(f"AdapterHub config {field_name} = {shown(config.get(field_name))!r}: {why}")
        for field_name in ("r", "alpha"):
            value = config.get(field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise files.fail(f"AdapterHub config {field_name} = {shown(value)!r}: expected a positive number")
        name = data.get("name")
        return config, name if isinstance(name, str) else None
