"""Garbage collection of a store: what no published version, leaderboard or running pipeline
references goes, and ``verify`` checks what stays.

A version or leaderboard record (:mod:`condense.versions`) names every stage key it was built from;
a running pipeline's lease (:mod:`condense.leases`) names what it uses. Everything else older than a
grace period is removable: stage artifacts, run reports beyond the newest few per published set,
stale leases, idle lock files and, on request, unfinished work.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from condense.errors import CondenseError
from condense.leases import LEASES, STALE_SECONDS, leased
from condense.stages.base import all_stages
from condense.store import META, Store
from condense.store.local import DAMAGED, LOCKS
from condense.versions import RUNS, VERSIONS, list_leaderboards, list_versions

INFRASTRUCTURE = "garbage collection and verification of a store"

KEEP_RUNS = 10
"""Run folders gc keeps per published (dataset, method, IPC), newest first."""


@dataclass
class Collection:
    """What ``gc`` removes (or would remove), and what it leaves alone; paths relative to the store."""

    removable: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0
    partial: list[str] = field(default_factory=list)
    """Unfinished work (resumable checkpoints, uploads no commit marker names); removed only with
    ``partials=True``."""
    damaged: list[str] = field(default_factory=list)
    """Entries kept because what would say whether they are needed is unreadable, one line each."""


def _referenced(store: Store) -> set[tuple[str, str]]:
    """What a published version or a running pipeline (its lease) uses."""
    keep = leased(store)
    for record in list_versions(store):
        for name, key in record["keys"].items():
            if key:
                keep.add((name, key))  # a version's keys are named by their stage
        keep.update(("evaluate", key) for key in record.get("evaluations", []))
    for record in list_leaderboards(store):
        keep.update((stage, key) for stage, key in record["artifacts"])
    return keep


def _local(store: Store) -> bool:
    return isinstance(store.fs, LocalFileSystem)


def _is_link(store: Store, relative: str) -> bool:
    return _local(store) and os.path.islink(f"{store.base}/{relative}")


def _children(store: Store, relative: str) -> list[str]:
    """Names in the store folder ``relative`` (none if it does not exist or is a link: gc never
    looks, let alone deletes, behind a link)."""
    folder = f"{store.base}/{relative}"
    store.fs.invalidate_cache(folder)
    if _is_link(store, relative) or not store.fs.isdir(folder):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in store.fs.ls(folder, detail=False))


def _changed(store: Store, relative: str) -> float:
    """When the store entry ``relative`` last changed (POSIX seconds): its commit marker's time if it
    has one, else its newest file's (object stores have no folder times)."""
    path = f"{store.base}/{relative}"
    if _is_link(store, relative):
        return os.lstat(path).st_mtime
    marker = f"{path}/{META}"
    files = [marker] if store.fs.isfile(marker) else store.fs.find(path) or [path]
    return max(store.fs.modified(f).timestamp() for f in files)


def _size(store: Store, relative: str) -> int:
    path = f"{store.base}/{relative}"
    if not _local(store):
        return int(store.fs.du(path))
    if os.path.islink(path) or os.path.isfile(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def _remove(store: Store, relative: str) -> None:
    """Delete a store entry; on a local disk never through a link, never outside the store: a link is
    unlinked itself, and a path whose folders lead elsewhere is refused."""
    path = f"{store.base}/{relative}"
    if not _local(store):
        store.fs.rm(path, recursive=True)
        return
    root = os.path.realpath(store.base)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.realpath(parent) != parent or not (parent + os.sep).startswith(root + os.sep):
        raise CondenseError(f"refusing to remove {relative}: its folder is a link out of {store.location}")
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)  # removes links inside the tree, never what they point to


def collect(
    store: Store, partials: bool = False, grace_seconds: float = 3600, keep_runs: int = KEEP_RUNS
) -> Collection:
    """Artifacts no version references: stage directories, their run reports (and, of published
    sets, all but the newest ``keep_runs`` per dataset/method/IPC), stale leases of killed runs, and
    (optionally) unfinished work: ``.partial`` checkpoints, ``.tmp`` leftovers, and artifact folders
    without a commit marker (an upload to object storage that crashed before committing). Anything
    written in the last ``grace_seconds`` is kept: a run still in progress has not published its
    version yet."""
    keep = _referenced(store)
    recent = time.time() - grace_seconds
    exports = {key for stage, key in keep if stage == "export"}
    found = Collection()
    for stage in sorted(all_stages()):
        for name in _children(store, stage):
            entry = f"{stage}/{name}"
            if name == LOCKS:  # only idle ones, and only here: a remote store's locks are per machine
                if _local(store):
                    old = [n for n in _children(store, entry) if _changed(store, f"{entry}/{n}") <= recent]
                    found.removable.extend(f"{entry}/{n}" for n in old if n.endswith(".lock"))
                continue
            if _is_link(store, entry):  # not written by condense: a link is garbage, never followed
                (found.removable if partials else found.partial).append(entry)
            elif name in (".partial", ".tmp", DAMAGED):
                leftovers = [n for n in _children(store, entry) if (stage, n.rsplit("-", 1)[0]) not in keep]
                old = [f"{entry}/{n}" for n in leftovers if _changed(store, f"{entry}/{n}") <= recent]
                (found.removable if partials else found.partial).extend(old)
            elif (stage, name) in keep or _changed(store, entry) > recent:
                found.kept += 1
            elif not store.fs.isfile(f"{store.base}/{entry}/{META}"):
                (found.removable if partials else found.partial).append(entry)
            else:
                found.removable.append(entry)
    published: dict[tuple[Any, ...], list[str]] = {}
    for name in _children(store, RUNS):
        entry = f"{RUNS}/{name}"
        try:
            summary = _run_summary(store, entry)
        except ValueError:
            found.damaged.append(f"{entry}/summary.json is unreadable: kept; remove the folder by hand")
            continue
        export = summary.get("keys", {}).get("export") if summary else None
        if export in exports:
            series = (summary.get("dataset"), summary.get("method"), summary.get("ipc"))  # type: ignore[union-attr]
            published.setdefault(series, []).append(name)
        elif _changed(store, entry) <= recent:
            found.removable.append(entry)
    # Every rerun adds a run folder, a fully cached nightly one too: keep each series' newest reports.
    for names_in_series in published.values():
        for name in sorted(names_in_series)[:-keep_runs]:  # run ids sort by their start time
            if _changed(store, f"{RUNS}/{name}") <= recent:
                found.removable.append(f"{RUNS}/{name}")
    for name in _children(store, LEASES):  # a killed run's lease protects nothing once stale
        if name.endswith(".json") and _changed(store, f"{LEASES}/{name}") <= min(
            recent, time.time() - STALE_SECONDS
        ):
            found.removable.append(f"{LEASES}/{name}")
    found.bytes = sum(_size(store, p) for p in found.removable)
    return found


def _run_summary(store: Store, entry: str) -> dict[str, Any] | None:
    """A run folder's summary (None when it has none); ValueError when it is unreadable."""
    path = f"{store.base}/{entry}/summary.json"
    if not store.fs.isfile(path):
        return None
    try:
        summary = json.loads(store.fs.cat_file(path))
    except UnicodeDecodeError as err:
        raise ValueError(str(err)) from None
    if not isinstance(summary, dict) or not isinstance(summary.get("keys", {}), dict):
        raise ValueError("not a run summary")
    return summary


def gc(
    store: Store,
    dry_run: bool = True,
    partials: bool = False,
    grace_seconds: float = 3600,
    keep_runs: int = KEEP_RUNS,
) -> Collection:
    """Remove what :func:`collect` finds (nothing when ``dry_run``)."""
    if not store.fs.isdir(f"{store.base}/{VERSIONS}"):
        raise CondenseError(f"{store.location} has no published versions: nothing marks what to keep")
    if keep_runs < 1:
        raise CondenseError(f"keep_runs must be at least 1, not {keep_runs}: the latest run's report stays")
    found = collect(store, partials, grace_seconds, keep_runs)
    if not dry_run:
        leased_now = leased(store)  # a run may have started since the listing
        held = []  # what stays after all, and is not reported gone
        for path in found.removable:
            stage, _, key = path.partition("/")
            if key.startswith(f"{LOCKS}/"):  # a lock a run holds now stays
                if not store.drop_lock(stage, key.removeprefix(f"{LOCKS}/").removesuffix(".lock")):
                    held.append(path)
            elif (stage, key) in leased_now:
                held.append(path)
            else:
                _remove(store, path)
        found.removable = [p for p in found.removable if p not in held]
    return found


def verify(store: Store, move_aside: bool = False) -> tuple[int, list[str]]:
    """Check every committed artifact's files against its checksums, contents included. Returns
    (artifacts checked, one line per damaged one); with ``move_aside`` the damaged are moved aside so
    that the next run recomputes them."""
    if not store.fs.isdir(store.base):
        raise CondenseError(f"no store at {store.location}: nothing to verify")
    checked, damaged = 0, []
    for stage in sorted(all_stages()):
        for name in _children(store, stage):
            if name.startswith(".") or _is_link(store, f"{stage}/{name}") or not store.has(stage, name):
                continue
            checked += 1
            try:
                if _local(store):
                    store.verify(stage, name, hash_up_to=float("inf"))
                else:
                    store.path(stage, name)  # mirrored here, every file checked on the way
            except CondenseError as err:
                moved = f"; moved aside to {store.quarantine(stage, name)}" if move_aside else ""
                damaged.append(f"{err}{moved}")
    return checked, damaged
