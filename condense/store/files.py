"""File-level helpers of the store: canonical hashing, atomic JSON, exclusive creation, zarr groups."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

INFRASTRUCTURE = "the store: where artifacts live, not what they hold"

META = "meta.json"


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), so equal configs hash equally."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def disk_bytes(path: Path) -> int:
    """Bytes a file or directory tree takes on disk (sum of file sizes)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it already exists; True when this call created it.

    Readers never see a half-written file: locally the bytes go to a temporary file that is then
    hard-linked to ``path`` (atomic, and fails if ``path`` exists); on object stores the write is one
    conditional PUT (``If-None-Match: *`` on S3), which fsspec exposes as mode ``"xb"``.
    """
    if isinstance(fs, LocalFileSystem):
        path = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        Path(tmp).write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as out:
            out.write(data)
    except FileExistsError:
        return False
    return True


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def save_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], chunks: Mapping[str, tuple] | None = None
) -> None:
    """Write numpy arrays as one zarr v3 group (replacing what is there)."""
    import zarr  # here, not at the top: listings and config commands never touch an array

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        arr = group.create_array(
            name, shape=value.shape, dtype=value.dtype, chunks=(chunks or {}).get(name, "auto")
        )
        arr[...] = value


def load_arrays(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    import zarr

    # Version 3 only: a version-2 group could name numcodecs' pickle codec, i.e. run code on read.
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return {name: group[name][...] for name in (names or sorted(group.array_keys()))}


def make_dir_racing_cleanup(path: Path, exist_ok: bool = False, attempts: int = 20) -> None:
    """``mkdir -p`` that tolerates concurrent writers pruning the (empty) parents in between.

    A writer that finishes removes empty scaffolding directories (:meth:`condense.store.Store.writing`);
    if that happens while we create the parents, ``mkdir`` fails with FileNotFoundError, or with
    FileExistsError for a parent that vanished again before pathlib could check it. Both mean
    "try again". Once the leaf exists its parents are non-empty and nobody prunes them.
    """
    for attempt in range(attempts):
        try:
            path.mkdir(parents=True, exist_ok=exist_ok)
            return
        except (FileNotFoundError, FileExistsError):
            if path.is_dir():
                if exist_ok:
                    return
                raise
            if attempt == attempts - 1:
                raise
