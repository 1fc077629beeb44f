"""Published versions of distilled sets and of leaderboards: small JSON records in the store.

Every pipeline run ends by publishing its exported set under (dataset, method, ipc). A run whose
export is the one the latest version already points at (same data, config and code: every stage a
cache hit) publishes nothing new; anything else becomes version n + 1. Versions are small JSON
records, ``<store>/versions/<dataset>/<method>/ipc<N>/v<NNNN>.json``, that name every stage key the
set was built from, so garbage collection (:mod:`condense.garbage`) knows what to keep.

Leaderboards of ``condense compare`` are versioned the same way, per (dataset, comparison name):
``<store>/leaderboards/<dataset>/<name>/v<NNNN>.json`` names the folder of its files and every
artifact its cells were computed from (``gc`` keeps those too).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from condense.errors import CondenseError
from condense.store import Store, create_exclusive, json_bytes, names

INFRASTRUCTURE = "version records"

VERSIONS = "versions"
RUNS = "runs"
LEADERBOARDS = "leaderboards"


def _series(store: Store, dataset: str, method: str, ipc: int) -> str:
    return f"{store.base}/{VERSIONS}/{dataset}/{method}/ipc{ipc}"


def _record(store: Store, path: str) -> dict[str, Any]:
    """The record at ``path``, every name in it that becomes a path checked first: a store may be
    shared, and a crafted key such as ``../../etc`` must never reach a rename or a delete."""
    where = f"{'leaderboard' if f'/{LEADERBOARDS}/' in path else 'version'} record {path}"
    try:
        record = json.loads(store.fs.cat_file(path))
        if not isinstance(record, dict) or type(record["version"]) is not int or record["version"] < 1:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise CondenseError(f"{where} is damaged (not a record); restore or remove it") from None
    if "ipc" in record and (type(record["ipc"]) is not int or record["ipc"] < 1):
        raise CondenseError(f"{where}: ipc {record['ipc']!r} is not a positive whole number")
    for name in ("dataset", "method", "name"):
        if name in record:
            names.component(record[name], name, where)
    if "folder" in record:
        names.relative(record["folder"], "folder", where)
    for stage, key in _keys_of(record, where):
        names.component(stage, "stage", where)
        names.stage_key(key, f"{stage} key", where)
    return record


def _keys_of(record: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """Every (stage, key) a version or leaderboard record names: its ``keys``, ``evaluations`` and
    ``artifacts``; one line when their shapes are wrong."""
    keys, evaluations = record.get("keys", {}), record.get("evaluations", [])
    artifacts = record.get("artifacts", [])
    shapes_ok = (
        isinstance(keys, dict)
        and isinstance(evaluations, list)
        and isinstance(artifacts, list)
        and all(isinstance(pair, list) and len(pair) == 2 for pair in artifacts)
    )
    if not shapes_ok:
        raise CondenseError(f"{where}: its keys, evaluations or artifacts are not what a record holds")
    return [
        *((stage, key) for stage, key in keys.items() if key),
        *(("evaluate", key) for key in evaluations),
        *((stage, key) for stage, key in artifacts),
    ]


def _read(store: Store, paths: list[str]) -> list[dict[str, Any]]:
    return sorted((_record(store, p) for p in paths), key=lambda r: r["version"])


def _records(store: Store, folder: str) -> list[dict[str, Any]]:
    store.fs.invalidate_cache(folder)  # another machine may have published since we last listed
    return _read(store, store.fs.glob(f"{folder}/v*.json"))


def publish(store: Store, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Publish ``record`` (dataset, method, ipc, keys, ...) as the next version unless the latest
    already points at the same export. Returns (the version record, whether it is new)."""
    folder = _series(store, record["dataset"], record["method"], record["ipc"])
    return publish_in(
        store, folder, record, lambda latest: latest["keys"]["export"] == record["keys"]["export"]
    )


def publish_in(
    store: Store, folder: str, record: dict[str, Any], unchanged: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, Any], bool]:
    """Publish ``record`` as the next version in the series ``folder`` unless ``unchanged(latest)``.
    Returns (the version record, whether it is new).

    Concurrent publishers race on an exclusive create of the next file name (a conditional PUT on
    object storage); the loser retries with the number after.
    """
    store.fs.makedirs(folder, exist_ok=True)
    while True:
        existing = _records(store, folder)
        if existing and unchanged(existing[-1]):
            return existing[-1], False
        number = existing[-1]["version"] + 1 if existing else 1
        entry = {
            **record,
            "version": number,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if create_exclusive(store.fs, f"{folder}/v{number:04d}.json", json_bytes(entry)):
            return entry, True


def leaderboard_series(store: Store, dataset: str, name: str) -> str:
    """Where the versions of the leaderboard ``name`` on ``dataset`` are published."""
    return f"{store.base}/{LEADERBOARDS}/{dataset}/{name}"


def list_leaderboards(store: Store) -> list[dict[str, Any]]:
    """Every published leaderboard version in the store."""
    root = f"{store.base}/{LEADERBOARDS}"
    store.fs.invalidate_cache(root)
    records = _read(store, store.fs.glob(f"{root}/*/*/v*.json"))
    for record in records:  # what it keeps must be known, or gc would take its artifacts
        if not isinstance(record.get("artifacts"), list):
            raise CondenseError(
                f"leaderboard record {record.get('dataset')}/{record.get('name')} v{record['version']} is"
                " damaged (no artifacts list); restore or remove it"
            )
    return records


def list_versions(store: Store, latest_only: bool = False) -> list[dict[str, Any]]:
    """Every version record in the store (or only the latest per dataset/method/ipc)."""
    root = f"{store.base}/{VERSIONS}"
    store.fs.invalidate_cache(root)
    by_series: dict[str, list[str]] = {}
    for path in store.fs.glob(f"{root}/*/*/ipc*/v*.json"):
        by_series.setdefault(posixpath.dirname(path), []).append(path)
    out: list[dict[str, Any]] = []
    for series in sorted(by_series):
        records = _read(store, by_series[series])
        out += records[-1:] if latest_only else records
    return out


def pick(records: list[dict[str, Any]], name: str, version: int | str, missing: str) -> dict[str, Any]:
    """``version`` ("latest" or a number) out of one series' records, sorted by version."""
    if not records:
        raise CondenseError(missing)
    if version == "latest":
        return records[-1]
    for record in records:
        if record["version"] == int(version):
            return record
    raise CondenseError(f"{name} has versions {[r['version'] for r in records]}, not {version}")


def resolve(
    store: Store, dataset: str, method: str, ipc: int, version: int | str = "latest"
) -> dict[str, Any]:
    """The version record of (dataset, method, ipc): ``"latest"`` or a version number."""
    name = f"{dataset}/{method}/ipc{ipc}"
    known = ", ".join(sorted({f"{r['dataset']}/{r['method']}/ipc{r['ipc']}" for r in list_versions(store)}))
    missing = f"no distilled set {name} in {store.location}; published: {known or 'none'}"
    return pick(_records(store, _series(store, dataset, method, ipc)), name, version, missing)
