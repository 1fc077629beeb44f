"""Content-addressed artifact store.

Layout: ``<root>/<stage>/<key>/`` where ``key`` hashes the stage name, its config, the code that
computes it and the keys of its inputs. A finished artifact is a directory that was renamed into
place, so its existence means it is complete: work happens under ``<root>/<stage>/.partial/<key>/``
(which also holds resumable checkpoints) and a crash never leaves a half artifact at the final name.
Arrays are zarr (v3) groups; small metadata is JSON.

:func:`open_store` also takes an fsspec URL (``s3://bucket/store``, ``gs://...``, ``file:///...``):
see :mod:`condense.remote_store` for how artifacts are committed where there is no rename.
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
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

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


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a local directory, or an fsspec URL (``scheme://...``)."""
    if "://" in str(location):
        from condense.remote_store import RemoteStore

        return RemoteStore(str(location))
    return Store(location)


class Store:
    """A directory of finished artifacts, addressed by (stage, key).

    ``root`` is the local directory artifacts are read from; ``fs`` and ``base`` address the store
    itself (the same directory here, a bucket prefix for a :class:`~condense.remote_store.RemoteStore`)
    for what is shared between machines: versions and run reports.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)
        """What to pass to another process (a task on a worker) so that it opens this same store."""
        self.fs: AbstractFileSystem = LocalFileSystem()
        self.base = str(self.root)

    def _local(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def path(self, stage: str, key: str) -> Path:
        """Local directory of the finished artifact (fetched first if the store is remote)."""
        return self._local(stage, key)

    def url(self, stage: str, key: str) -> str:
        """Where the finished artifact lives in the store itself, for reports."""
        return str(self._local(stage, key))

    def share(self, relative: str) -> None:
        """Make the local files under ``root/<relative>`` visible to every machine using the store.

        A local store is one directory, so there is nothing to do; a remote store uploads them.
        """

    def pull(self, stage: str, key: str, *names: str) -> None:
        """Fetch resumable work (files or folders ``names`` of the partial, all if none) that other
        machines shared with :meth:`push` into the local partial. Local stores share it already."""

    def push(self, stage: str, key: str, *names: str) -> None:
        """Share files or folders ``names`` of the local partial with other machines."""
        for name in names:
            self.share(f"{stage}/.partial/{key}/{name}")

    def has(self, stage: str, key: str) -> bool:
        return (self._local(stage, key) / META).is_file()

    def meta(self, stage: str, key: str) -> dict[str, Any]:
        return read_json(self._local(stage, key) / META)

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
        return self._seal(stage, key, work_dir, meta)

    def _seal(self, stage: str, key: str, work_dir: Path, meta: Mapping[str, Any]) -> Path:
        """Write ``meta`` into ``work_dir`` and rename it to the local artifact directory."""
        write_json(work_dir / META, {"stage": stage, "key": key, **meta})
        final = self._local(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(work_dir, final)
        except OSError:
            if not (final / META).is_file():
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
