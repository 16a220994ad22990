"""Lazy package exports (PEP 562): a package's public names are imported on first use.

`import lora_analysis` (and the command line's `--help`) then costs nothing until a name is
used; `lora_analysis.train` imports the training code (and torch) only when it is called for.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, whose name `n` lives in its submodule
    `exports[n]` (relative, e.g. ".adapters"). A resolved name is cached in the package."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
