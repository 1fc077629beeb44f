"""A store on object storage (any fsspec URL), with a local mirror of what each machine reads.

Object stores have no atomic rename, so an artifact is committed in two steps:

1. its files are uploaded under ``<stage>/<key>/<payload>/``, a fresh name no other writer uses;
2. ``<stage>/<key>/meta.json``, naming the payload and listing its files, is created *exclusively*
   (one conditional PUT).

The marker is the commit: readers trust an artifact only once it exists, and it appears whole or not
at all. A crash before it leaves a payload no marker names (``condense gc --partials`` removes it);
two machines finishing the same key both upload, the first marker wins and the other deletes its
payload. Committed artifacts never change, so each machine mirrors those it reads into a local cache
(``$CONDENSE_CACHE``, default ``~/.cache/condense``) and reads them from disk, with zarr and torch,
exactly as from a local store.

Resumable work stays on local disk and is shared through ``<stage>/.partial/<key>/``: expert tasks
push each trajectory as they finish it and distillation pushes every checkpoint, so the experts can
be recorded on many machines and a task retried elsewhere resumes where the last one stopped.

Credentials and endpoints come from the filesystem's own configuration (for S3: the AWS environment
variables or files, ``AWS_ENDPOINT_URL`` for S3-compatible servers) or fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>`` variables; every worker needs the same.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from condense.errors import CondenseError, DamagedArtifactError
from condense.store import integrity, names
from condense.store.files import META, create_exclusive, json_bytes
from condense.store.local import Store

INFRASTRUCTURE = "the store: where artifacts live, not what they hold"

DEFAULT_CACHE = Path.home() / ".cache" / "condense"


class RemoteStore(Store):
    """The store at ``url``; ``root`` is this machine's mirror of it."""

    def __init__(self, url: str, cache: str | Path | None = None):
        location = url.rstrip("/")
        cache_root = Path(cache or os.environ.get("CONDENSE_CACHE") or DEFAULT_CACHE)
        super().__init__(cache_root / "stores" / hashlib.sha256(location.encode()).hexdigest()[:16])
        self.location = location
        try:
            self.fs, base = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as err:  # unknown scheme, or its fsspec package missing
            raise CondenseError(f"cannot open the store {location}: {err}") from None
        if isinstance(self.fs, LocalFileSystem):  # object stores have no folders; a file:// store
            self.fs = LocalFileSystem(auto_mkdir=True)  # needs each upload's parents made
        self.base = base.rstrip("/")
        self._markers: dict[tuple[str, str], dict[str, Any]] = {}

    def _remote(self, *parts: str) -> str:
        return "/".join((self.base, *(p.strip("/") for p in parts if p)))

    def marker(self, stage: str, key: str) -> dict[str, Any] | None:
        """The commit marker of ``(stage, key)`` in the store, or None while it is not committed."""
        if (stage, key) not in self._markers:
            path = self._remote(self._stage(stage), self._name(key), META)
            self.fs.invalidate_cache(path)  # another machine may have committed since we listed
            try:
                raw = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
            marker, wrong = integrity.parse_meta(raw)
            if marker is None:
                raise DamagedArtifactError(stage, key, f"{wrong} (in {self.location})")
            self._markers[stage, key] = marker
        return self._markers[stage, key]

    def has(self, stage: str, key: str) -> bool:
        return super().has(stage, key) or self.marker(stage, key) is not None

    def meta(self, stage: str, key: str) -> dict[str, Any]:
        if super().has(stage, key):
            return super().meta(stage, key)
        marker = self.marker(stage, key)
        if marker is None:
            raise CondenseError(f"artifact {stage}/{key} is not committed in {self.location}")
        return marker

    def url(self, stage: str, key: str) -> str:
        marker = self.marker(stage, key) or {}
        return "/".join((self.location, stage, key, *([marker["payload"]] if "payload" in marker else [])))

    def path(self, stage: str, key: str) -> Path:
        final = self._local(stage, key)
        if (final / META).is_file():
            return super().path(stage, key)
        marker = self.marker(stage, key)
        if marker is None:
            raise CondenseError(f"artifact {stage}/{key} is not committed in {self.location}")
        folder, files = self._payload(stage, key, marker)
        with self.writing(stage, key) as tmp:
            self._download([f"{folder}/{name}" for name in files], [tmp / name for name in files])
            wrong = integrity.problem(tmp, marker, integrity.content_limit())
            if wrong is not None:  # the store's own copy is damaged: never mirror it
                raise DamagedArtifactError(stage, key, f"{wrong} (in {self.url(stage, key)})")
            self._seal(stage, key, tmp, marker)
        return final

    def verify(self, stage: str, key: str, hash_up_to: float = 0) -> None:
        if (self._local(stage, key) / META).is_file():
            super().verify(stage, key, hash_up_to)
        else:
            self.meta(stage, key)  # the marker's digest; files are checked when they are mirrored

    def quarantine(self, stage: str, key: str) -> str:
        """Drop this machine's damaged mirror of an artifact (the next read downloads it again)."""
        shutil.rmtree(self._local(stage, key), ignore_errors=True)
        return f"{self.url(stage, key)} (this machine's copy was removed)"

    def _payload(self, stage: str, key: str, marker: dict[str, Any]) -> tuple[str, list[str]]:
        """Folder and file names of a committed artifact. A store written locally and copied to
        object storage (``aws s3 sync``) has no payload folder: its files sit beside meta.json."""
        where = f"commit marker of {stage}/{key} in {self.location}"
        if "payload" in marker:
            payload = names.component(marker["payload"], "payload", where)
            return self._remote(stage, key, payload), [
                names.relative(f, "file", where) for f in marker["files"]
            ]
        folder = self._remote(stage, key)
        found = [path[len(folder) + 1 :] for path in self.fs.find(folder)]
        return folder, [name for name in found if name != META]

    def commit(self, stage: str, key: str, work_dir: Path, meta: dict[str, Any]) -> Path:
        checksums = integrity.checksums(work_dir)
        files = sorted(checksums)  # the marker is written last, below
        payload = uuid.uuid4().hex[:12]
        folder = self._remote(stage, key, payload)
        if files:
            self.fs.put([str(work_dir / name) for name in files], [f"{folder}/{name}" for name in files])
        marker = integrity.sealed(
            {
                "stage": stage,
                "key": key,
                **meta,
                integrity.CHECKSUMS: checksums,
                "payload": payload,
                "files": files,
            }
        )
        if not create_exclusive(self.fs, self._remote(stage, key, META), json_bytes(marker)):
            # another machine committed this key first: keep theirs (same key, same content)
            if files:
                self.fs.rm(folder, recursive=True)
            shutil.rmtree(work_dir, ignore_errors=True)
            return self.path(stage, key)
        self._markers[stage, key] = marker
        shared = self._remote(stage, ".partial", key)
        if self.fs.exists(shared):
            self.fs.rm(shared, recursive=True)
        return self._seal(stage, key, work_dir, marker)  # our files become the local mirror

    def share(self, relative: str) -> None:
        local = self.root / relative
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        if files:
            remote = [self._remote(p.relative_to(self.root).as_posix()) for p in files]
            self.fs.put([str(p) for p in files], remote)

    def pull(self, stage: str, key: str, *names: str) -> None:
        shared = self._remote(stage, ".partial", key)
        local = self.partial(stage, key)
        for name in names or ("",):
            source = self._remote(stage, ".partial", key, name)
            self.fs.invalidate_cache(source)
            found = [p for p in self.fs.find(source) if not (local / p[len(shared) + 1 :]).exists()]
            self._download(found, [local / p[len(shared) + 1 :] for p in found])

    def _download(self, remote: list[str], local: list[Path]) -> None:
        """Fetch files; each appears at its local name whole (temporary name, then rename)."""
        if not remote:
            return
        tmp = [p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp") for p in local]
        for path in tmp:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(remote, [str(p) for p in tmp])
        for path, final in zip(tmp, local, strict=True):
            os.replace(path, final)
