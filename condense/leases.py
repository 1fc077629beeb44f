"""Leases: a running pipeline's claim on the artifacts it uses, so that ``gc`` leaves them alone.

A run writes ``<store>/leases/<run_id>.json`` listing the (stage, key) pairs of its plan and rewrites
it every ``REFRESH_SECONDS`` while it runs; ``gc`` keeps everything a lease refreshed in the last
``STALE_SECONDS`` names, however old the artifact, and removes the lease when the run ends. A run
killed without cleaning up leaves a lease that goes stale on its own. Any run, however long, thus
keeps its inputs: an expert buffer read for hours by a distillation, a dataset an earlier failed run
left unreferenced.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from condense.store import Store, json_bytes, write_json

INFRASTRUCTURE = "what a running pipeline protects from gc"

LEASES = "leases"
REFRESH_SECONDS = 60.0
STALE_SECONDS = 15 * 60.0


class Lease:
    """``with Lease(store, run_id) as lease: lease.protect(keys) ...``"""

    def __init__(self, store: Store, run_id: str, refresh_seconds: float = REFRESH_SECONDS):
        self.store, self.run_id, self.refresh_seconds = store, run_id, refresh_seconds
        self.path = f"{store.base}/{LEASES}/{run_id}.json"
        self.keys: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._refresh, name=f"lease-{run_id}", daemon=True)

    def protect(self, keys: Iterable[tuple[str, str]]) -> None:
        """Add (stage, key) pairs to what this run uses, visible to ``gc`` from now on."""
        with self._lock:
            self.keys.update(keys)
        self._write()

    def _write(self) -> None:
        with self._lock:
            record = {"run_id": self.run_id, "refreshed": time.time(), "keys": sorted(self.keys)}
        if isinstance(self.store.fs, LocalFileSystem):
            self.store.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
            write_json(Path(self.path), record)  # atomic: gc never reads half a lease
        else:
            self.store.fs.pipe_file(self.path, json_bytes(record))  # one PUT: whole or absent

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            if self.keys:
                self._write()

    def __enter__(self) -> Lease:
        self._thread.start()  # the lease is written by the first protect(): a run that fails first
        return self  # leaves nothing behind

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        if not self.keys:
            return
        self.store.fs.rm_file(self.path)
        if isinstance(self.store.fs, LocalFileSystem):
            with contextlib.suppress(OSError):  # the last run out leaves no empty folder
                os.rmdir(posixpath.dirname(self.path))


def _read(store: Store, path: str) -> dict[str, Any] | None:
    try:
        record = json.loads(store.fs.cat_file(path))
    except (OSError, ValueError):
        return None  # vanished (the run ended) or unreadable: it protects nothing
    return record if isinstance(record, dict) else None


def leased(store: Store, now: float | None = None) -> set[tuple[str, str]]:
    """Every (stage, key) a live lease (refreshed in the last ``STALE_SECONDS``) protects."""
    folder = f"{store.base}/{LEASES}"
    store.fs.invalidate_cache(folder)
    if not store.fs.isdir(folder):
        return set()
    now = time.time() if now is None else now
    keep: set[tuple[str, str]] = set()
    for path in store.fs.glob(f"{folder}/*.json"):
        record = _read(store, path)
        if record and now - float(record.get("refreshed", 0)) < STALE_SECONDS:
            keep.update((str(stage), str(key)) for stage, key in record.get("keys", []))
    return keep
