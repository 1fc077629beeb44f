"""The artifact store: finished work addressed by (stage, key), on a local disk or object storage.

``open_store`` takes a directory or any fsspec URL (``s3://bucket/store``, ``gs://...``,
``file:///...``); see :mod:`condense.store.local` and :mod:`condense.store.remote` for how each
commits an artifact atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from condense.store.files import (
    META,
    create_exclusive,
    disk_bytes,
    json_bytes,
    load_arrays,
    read_json,
    save_arrays,
    stable_hash,
    write_json,
)
from condense.store.local import Store

INFRASTRUCTURE = "the store: where artifacts live, not what they hold"

DEFAULT_STORE = "data/store"
"""The store a run uses unless told otherwise, relative to the working directory."""


def default_store() -> str:
    """``$CONDENSE_STORE``, else ``./data/store`` (relative to where the command runs)."""
    return os.environ.get("CONDENSE_STORE") or DEFAULT_STORE


def open_store(location: str | Path | None = None) -> Store:
    """The store at ``location`` (default: :func:`default_store`): a local directory, or an fsspec
    URL (``scheme://...``)."""
    location = location or default_store()
    if "://" in str(location):
        from condense.store.remote import RemoteStore

        return RemoteStore(str(location))
    return Store(location)


__all__ = [
    "DEFAULT_STORE",
    "META",
    "Store",
    "create_exclusive",
    "default_store",
    "disk_bytes",
    "json_bytes",
    "load_arrays",
    "open_store",
    "read_json",
    "save_arrays",
    "stable_hash",
    "write_json",
]
