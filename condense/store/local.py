"""Content-addressed artifact store on a local (or shared) disk.

Layout: ``<root>/<stage>/<key>/`` where ``key`` hashes the stage name, its config, the code that
computes it and the keys of its inputs. A finished artifact is a directory that was renamed into
place, so its existence means it is complete: work happens under ``<root>/<stage>/.partial/<key>/``
(which also holds resumable checkpoints) and a crash never leaves a half artifact at the final name.
Arrays are zarr (v3) groups; small metadata is JSON.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from condense.store.files import META, make_dir_racing_cleanup, read_json, write_json


class Store:
    """A directory of finished artifacts, addressed by (stage, key).

    ``root`` is the local directory artifacts are read from; ``fs`` and ``base`` address the store
    itself (the same directory here, a bucket prefix for a :class:`~condense.store.remote.RemoteStore`)
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
        make_dir_racing_cleanup(path, exist_ok=True)
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
        make_dir_racing_cleanup(tmp)
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
