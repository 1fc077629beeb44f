"""condense: dataset distillation you can read like the papers.

    import condense
    ds = condense.load_distilled("data/store", dataset="digits", method="mtt", ipc=1)
    image, label, soft = ds[0]

Importing ``condense`` is light: each name below is imported on first use, so loading a distilled
set does not import every method, faiss or Prefect.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_distilled": "condense.distilled",
    "DistilledDataset": "condense.distilled",
    "load_config": "condense.configure",
    "preset_names": "condense.configure",
    "PipelineConfig": "condense.config",
    "register_method": "condense.methods",
    "get_method": "condense.methods",
    "method_names": "condense.methods",
    "open_store": "condense.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'condense' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
