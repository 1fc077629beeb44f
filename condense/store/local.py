"""Content-addressed artifact store on a local (or shared) disk.

Layout: ``<root>/<stage>/<key>/`` where ``key`` hashes the stage name, its config, the code that
computes it and the keys of its inputs. A finished artifact is a directory that was renamed into
place, so its existence means it is complete: work happens under ``<root>/<stage>/.partial/<key>/``
(which also holds resumable checkpoints) and a crash never leaves a half artifact at the final name.
Arrays are zarr (v3) groups; small metadata is JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from condense.errors import CondenseError, DamagedArtifactError
from condense.store import integrity, names
from condense.store.files import META, make_dir_racing_cleanup, write_json

INFRASTRUCTURE = "the store: where artifacts live, not what they hold"

LOCKS = ".locks"
DAMAGED = ".damaged"
"""``<stage>/.damaged/<key>-<id>``: damaged artifacts moved aside (``gc --partials`` removes them)."""
_verified: set[tuple[str, str, str]] = set()
"""(store root, stage, key) whose contents this process has checked: committed artifacts never change."""


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
        return self.root / self._stage(stage) / self._name(key)

    def _stage(self, stage: str) -> str:
        """``stage`` when it is a plain folder name: every path below the root goes through here or
        :meth:`_name`, so that no key or name read from a record can climb out of the store."""
        return names.component(stage, "stage", f"store {self.location}")

    def _name(self, key: str) -> str:
        return names.component(key, "key", f"store {self.location}")

    def path(self, stage: str, key: str) -> Path:
        """Local directory of the finished artifact (fetched first if the store is remote), its files
        checked against their checksums the first time this process reads it; a damaged artifact is
        moved aside and raises :class:`DamagedArtifactError`."""
        folder = self._local(stage, key)
        if (str(self.root), stage, key) not in _verified:
            limit = integrity.content_limit()
            try:
                self.verify(stage, key, limit)
            except DamagedArtifactError:
                damaged = self.set_aside_if_damaged(stage, key, limit)
                if damaged is not None:
                    raise damaged from None
            _verified.add((str(self.root), stage, key))
        return folder

    def set_aside_if_damaged(
        self, stage: str, key: str, hash_up_to: float = 0
    ) -> DamagedArtifactError | None:
        """Check the artifact again, alone, and move it aside if it is still damaged; returns the
        damage (None when it is intact now).

        A check that found damage may have raced another job: one that moved the same artifact aside
        (its files vanish mid-read and look damaged) or committed a fresh copy since. Checking again
        under a lock means only the job that holds it judges, and nothing intact is moved."""
        with self.lock(stage, f"{key}.check"):
            if not os.path.lexists(self._local(stage, key)):
                return DamagedArtifactError(stage, key, "another job moved it aside")
            try:
                self.verify(stage, key, hash_up_to)
            except DamagedArtifactError as err:
                return DamagedArtifactError(stage, key, err.problem, self.quarantine(stage, key))
            return None

    def verify(self, stage: str, key: str, hash_up_to: float = 0) -> None:
        """Raise :class:`DamagedArtifactError` unless the artifact's meta is intact and its files have
        their recorded sizes (and contents, when it holds at most ``hash_up_to`` bytes)."""
        wrong = integrity.problem(self._local(stage, key), self.meta(stage, key), hash_up_to)
        if wrong is not None:
            raise DamagedArtifactError(stage, key, wrong)

    def quarantine(self, stage: str, key: str) -> str:
        """Move a damaged artifact aside (so that its stage is recomputed); returns where it went."""
        # Only ever a rename inside <store>/<stage>/: both names are checked plain names, and the
        # parents made are the store's own (never a folder elsewhere).
        source = self._local(stage, key)
        if source.parent.is_symlink():
            raise CondenseError(
                f"refusing to move {stage}/{key} aside: {source.parent} is a link out of the store"
            )
        target = self.root / stage / DAMAGED / f"{key}-{uuid.uuid4().hex[:8]}"
        make_dir_racing_cleanup(target.parent, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(source, target)
        return str(target)

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
        """The artifact's metadata, checked against its digest."""
        folder = self._local(stage, key)
        try:
            raw = (folder / META).read_bytes()
        except FileNotFoundError:
            if folder.is_dir():
                raise DamagedArtifactError(stage, key, f"{META} is missing") from None
            raise CondenseError(f"artifact {stage}/{key} is not in the store {self.location}") from None
        meta, wrong = integrity.parse_meta(raw)
        if meta is None:
            raise DamagedArtifactError(stage, key, str(wrong))
        return meta

    def partial(self, stage: str, key: str) -> Path:
        """Scratch directory of an unfinished artifact; survives crashes so work can resume."""
        path = self.root / self._stage(stage) / ".partial" / self._name(key)
        make_dir_racing_cleanup(path, exist_ok=True)
        return path

    def commit(self, stage: str, key: str, work_dir: Path, meta: Mapping[str, Any]) -> Path:
        """Seal ``work_dir`` as the artifact ``(stage, key)``: record every file's size and sha256 in
        its meta, write the meta, rename into place.

        If another process finished the same artifact first, keep theirs (same key, same content)
        and drop ours.
        """
        checksums = integrity.checksums(work_dir)
        record = integrity.sealed({"stage": stage, "key": key, **meta, integrity.CHECKSUMS: checksums})
        return self._seal(stage, key, work_dir, record)

    def _seal(self, stage: str, key: str, work_dir: Path, record: Mapping[str, Any]) -> Path:
        """Write the sealed ``record`` into ``work_dir`` and rename it to the local artifact directory.
        A folder already there without an intact meta (debris of a damaged or half-deleted artifact)
        is moved aside first."""
        write_json(work_dir / META, record)
        final = self._local(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir() and not self._intact_meta(final):
            self.quarantine(stage, key)
        try:
            os.rename(work_dir, final)
        except OSError:
            if not self._intact_meta(final):
                raise
            shutil.rmtree(work_dir, ignore_errors=True)  # another process committed it first
        else:
            _verified.add((str(self.root), stage, key))  # just written from checked files
        return final

    @staticmethod
    def _intact_meta(folder: Path) -> bool:
        try:
            return integrity.parse_meta((folder / META).read_bytes())[0] is not None
        except OSError:
            return False

    @contextmanager
    def lock(self, stage: str, name: str) -> Iterator[None]:
        """Hold ``<stage>/.locks/<name>`` exclusively (other processes and threads on this machine
        wait): two runs working on the same resumable artifact take turns instead of writing into
        one work folder at once. The lock goes with its holder, even one killed by SIGKILL."""
        path = self._lock_path(stage, name)
        while True:
            make_dir_racing_cleanup(path.parent, exist_ok=True)
            with open(path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                if not _is_file_at(handle, path):  # gc removed it while we waited: take the new one
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return

    def _lock_path(self, stage: str, name: str) -> Path:
        return self.root / self._stage(stage) / LOCKS / f"{self._name(name)}.lock"

    def drop_lock(self, stage: str, name: str) -> bool:
        """Remove the lock file ``name`` of ``stage`` unless someone holds it; whether it went. A
        waiter on the removed file notices (:meth:`lock` checks it still holds the file at the path)."""
        path = self._lock_path(stage, name)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after the unlink
        except FileNotFoundError:
            return True
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                if _is_file_at(handle, path):
                    path.unlink()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return True

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temporary directory for a one-shot artifact; removed if the block fails.

        The caller commits it with :meth:`commit` inside the block.
        """
        tmp = self.root / self._stage(stage) / ".tmp" / f"{self._name(key)}-{uuid.uuid4().hex[:8]}"
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


def _is_file_at(handle: Any, path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path`` (not one removed meanwhile)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
