"""One reader per adapter format family, tried in this order (the first whose `detect` accepts
the file reads it; each detect looks for keys or side files only its family writes):

    litgpt      torch file nesting its tensors under "model" (`lit_model.pth.lora`)
    torchtune   `<module>.lora_a.weight` / `.lora_b.weight`
    adapterhub  `<module>.loras.<adapter>.lora_A`, or AdapterHub's adapter_config.json
    diffusers   `.lora.down.weight`, `.lora_linear_layer.`, `.processor.…_lora.`, component-prefixed
                PEFT keys, or the `lora_adapter_metadata` header
    lycoris     `hada_*`, `lokr_*`, `diff` (LyCORIS LoHa, LoKr, full) in the kohya layout
    kohya       `<name>.lora_down.weight` / `.lora_up.weight` (sd-scripts, LyCORIS LoCon)
    peft        `base_model.model.` keys, PEFT roles, or a PEFT config (ours included)
    loralib     `<module>.lora_A` / `.lora_B` without `.weight`

Earlier readers are the more specific: AdapterHub's and loralib's `lora_A` keys differ only by
the `.loras.` part; PEFT's AdaLoRA `lora_A` keys carry its prefix or config; a torchtune key
would otherwise look like nothing else. A file no reader accepts is refused naming its keys.
"""

from __future__ import annotations

from .adapterhub import AdapterhubReader
from .common import AdapterFiles, ReadResult, Reader
from .diffusers import DiffusersReader
from .kohya import KohyaReader
from .litgpt import LitgptReader
from .loralib import LoralibReader
from .lycoris import LycorisReader
from .peft import PeftReader
from .torchtune import TorchtuneReader

READERS: tuple[Reader, ...] = (
    LitgptReader(), TorchtuneReader(), AdapterhubReader(), DiffusersReader(), LycorisReader(), KohyaReader(),
    PeftReader(), LoralibReader(),
)


def reader_for(files: AdapterFiles) -> Reader | None:
    """The first reader (in `READERS` order) that detects the file, or None."""
    return next((reader for reader in READERS if reader.detect(files)), None)


__all__ = ["READERS", "AdapterFiles", "ReadResult", "Reader", "reader_for"]
