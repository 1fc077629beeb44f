"""The grammar of every name that becomes part of a path in a store, checked before it does.

A store may be shared, and nothing read from it (a version record, a run summary, an artifact's
meta, a config) is trusted: a key such as ``../../../etc`` would otherwise become a path that the
store reads, renames or deletes. Stage keys are exactly their hex form; other names (stages,
datasets, methods, payload folders) are one path component that cannot climb: letters, digits,
``_ . -``, not starting with a dot.
"""

from __future__ import annotations

import re
from typing import Any

from condense.errors import CondenseError

INFRASTRUCTURE = "the store: the grammar of its paths"

KEY_CHARS = 20
"""Hex digits of a stage key (a truncated sha256 of what the artifact is made of)."""
STAGE_KEY = re.compile(rf"[0-9a-f]{{{KEY_CHARS}}}")
COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""One folder or file name: no separator, not ``.``/``..``, no hidden names, at most 128 characters."""


def component(value: Any, field: str, where: str) -> str:
    """``value`` when it is a safe path component, else one line naming ``where`` and ``field``."""
    if not isinstance(value, str) or not COMPONENT.fullmatch(value):
        raise CondenseError(
            f"{where}: {field} {value!r} is not a plain name (letters, digits, '_', '.', '-'; no leading '.')"
        )
    return value


def stage_key(value: Any, field: str, where: str) -> str:
    """``value`` when it is a stage key (exactly 20 lowercase hex digits), else one line naming
    ``where`` and ``field``."""
    if not isinstance(value, str) or not STAGE_KEY.fullmatch(value):
        raise CondenseError(f"{where}: {field} {value!r} is not a stage key ({KEY_CHARS} hex digits)")
    return value


def relative(value: Any, field: str, where: str) -> str:
    """``value`` when it is a relative path of plain names (``a/b.zarr/c``), else one line."""
    if not isinstance(value, str) or not all(COMPONENT.fullmatch(part) for part in value.split("/")):
        raise CondenseError(f"{where}: {field} {value!r} is not a relative path of plain names")
    return value
