"""Content-addressed artifact store.

Layout: ``<root>/<stage>/<key>/`` where ``key`` hashes the stage name, its config, the code that
computes it and the keys of its inputs. A finished artifact is a directory that was renamed into
place, so its existence means it is complete: work happens under ``<root>/<stage>/.partial/<key>/``
(which also holds resumable checkpoints) and a crash never leaves a half artifact at the final name.
Arrays are zarr (v3) groups; small metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

KEY_CHARS = 20
META = "meta.json"
DEFAULT_STORE = os.environ.get("CONDENSE_STORE", str(Path(__file__).resolve().parents[1] / "data" / "store"))
"""Where runs keep their artifacts unless told otherwise: ``$CONDENSE_STORE`` or ``data/store``."""


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), so equal configs hash equally."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def code_version(*modules: Any) -> str:
    """Hash of the source files of the modules a stage runs: editing them invalidates the stage."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, config: Any, code: str, inputs: Mapping[str, str] | None = None) -> str:
    return stable_hash({"stage": stage, "config": config, "code": code, "inputs": dict(inputs or {})})[
        :KEY_CHARS
    ]


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


def save_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], chunks: Mapping[str, tuple] | None = None
) -> None:
    """Write numpy arrays as one zarr v3 group (replacing what is there)."""
    group = zarr.open_group(str(path), mode="w")
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        arr = group.create_array(
            name, shape=value.shape, dtype=value.dtype, chunks=(chunks or {}).get(name, "auto")
        )
        arr[...] = value


def load_arrays(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][...] for name in (names or sorted(group.array_keys()))}


def _make_dir_racing_cleanup(path: Path, exist_ok: bool = False, attempts: int = 20) -> None:
    """``mkdir -p`` that tolerates concurrent writers pruning the (empty) parents in between.

    A writer that finishes removes empty scaffolding directories (see :meth:`Store.writing`); if
    that happens while we create the parents, ``mkdir`` fails with FileNotFoundError, or with
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


class Store:
    """A directory of finished artifacts, addressed by (stage, key)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / META).is_file()

    def meta(self, stage: str, key: str) -> dict[str, Any]:
        return read_json(self.path(stage, key) / META)

    def partial(self, stage: str, key: str) -> Path:
        """Scratch directory of an unfinished artifact; survives crashes so work can resume."""
        path = self.root / stage / ".partial" / key
        _make_dir_racing_cleanup(path, exist_ok=True)
        return path

    def commit(self, stage: str, key: str, work_dir: Path, meta: Mapping[str, Any]) -> Path:
        """Seal ``work_dir`` as the artifact ``(stage, key)``: write its meta, rename into place.

        If another process finished the same artifact first, keep theirs (same key, same content)
        and drop ours.
        """
        write_json(work_dir / META, {"stage": stage, "key": key, **meta})
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(work_dir, final)
        except OSError:
            if not self.has(stage, key):
                raise
            shutil.rmtree(work_dir, ignore_errors=True)
        return final

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temporary directory for a one-shot artifact; removed if the block fails.

        The caller commits it with :meth:`commit` inside the block.
        """
        tmp = self.root / stage / ".tmp" / f"{key}-{uuid.uuid4().hex[:8]}"
        _make_dir_racing_cleanup(tmp)
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            for empty in (tmp.parent, tmp.parent.parent, self.root):
                try:
                    empty.rmdir()  # leave no empty scaffolding behind a failed first write
                except OSError:
                    break
