"""Published versions of distilled sets, and garbage collection of what no version references.

Every pipeline run ends by publishing its exported set under (dataset, method, ipc). A run whose
export is the one the latest version already points at (same data, config and code: every stage a
cache hit) publishes nothing new; anything else becomes version n + 1. Versions are small JSON
records, ``<store>/versions/<dataset>/<method>/ipc<N>/v<NNNN>.json``, that name every stage key the
set was built from, so ``gc`` knows what to keep.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from condense.errors import CondenseError
from condense.store import Store, disk_bytes, read_json

VERSIONS = "versions"
RUNS = "runs"
STAGE_OF_KEY = {
    "dataset": "dataset",
    "experts": "experts",
    "teacher": "teacher",
    "distill": "distill",
    "soft_labels": "soft_labels",
    "relabel": "relabel",
    "export": "export",
}
"""Summary ``keys`` entry -> store stage directory."""


def _series(store: Store, dataset: str, method: str, ipc: int) -> Path:
    return store.root / VERSIONS / dataset / method / f"ipc{ipc}"


def _records(folder: Path) -> list[dict[str, Any]]:
    return sorted((read_json(p) for p in folder.glob("v*.json")), key=lambda r: r["version"])


def publish(store: Store, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Publish ``record`` (dataset, method, ipc, keys, ...) as the next version unless the latest
    already points at the same export. Returns (the version record, whether it is new).

    Concurrent publishers race on an exclusive create of the next file name; the loser retries.
    """
    folder = _series(store, record["dataset"], record["method"], record["ipc"])
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        existing = _records(folder)
        if existing and existing[-1]["keys"]["export"] == record["keys"]["export"]:
            return existing[-1], False
        number = existing[-1]["version"] + 1 if existing else 1
        entry = {
            **record,
            "version": number,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            with open(folder / f"v{number:04d}.json", "x") as out:
                json.dump(entry, out, indent=2, sort_keys=True, default=str)
        except FileExistsError:
            continue
        return entry, True


def list_versions(store: Store, latest_only: bool = False) -> list[dict[str, Any]]:
    """Every version record in the store (or only the latest per dataset/method/ipc)."""
    root = store.root / VERSIONS
    out: list[dict[str, Any]] = []
    for folder in sorted(p for p in root.glob("*/*/ipc*") if p.is_dir()):
        records = _records(folder)
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
    missing = f"no distilled set {name} in {store.root}; published: {known or 'none'}"
    return pick(_records(_series(store, dataset, method, ipc)), name, version, missing)


def resolve_url(
    url: str, dataset: str, method: str, ipc: int, version: int | str = "latest"
) -> tuple[Any, str]:
    """For a store copied to any fsspec URL (s3://, gs://, https://, memory://, ...): its filesystem
    and the path of the chosen version's export directory."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    name = f"{dataset}/{method}/ipc{ipc}"
    paths = fs.glob(f"{root}/{VERSIONS}/{dataset}/{method}/ipc{ipc}/v*.json")
    records = sorted((json.loads(fs.cat_file(p)) for p in paths), key=lambda r: r["version"])
    record = pick(records, name, version, f"no distilled set {name} published at {url}")
    return fs, f"{root}/export/{record['keys']['export']}"


def export_dir(store: Store, record: dict[str, Any]) -> Path:
    return store.path("export", record["keys"]["export"])


@dataclass
class Collection:
    """What ``gc`` removes (or would remove), and what it leaves alone."""

    removable: list[Path] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0
    partial: list[Path] = field(default_factory=list)
    """Unfinished work (resumable checkpoints); removed only with ``partials=True``."""


def _referenced(store: Store) -> set[tuple[str, str]]:
    keep: set[tuple[str, str]] = set()
    for record in list_versions(store):
        for name, key in record["keys"].items():
            if name in STAGE_OF_KEY and key:
                keep.add((STAGE_OF_KEY[name], key))
        keep.update(("evaluate", key) for key in record.get("evaluations", []))
    return keep


def collect(store: Store, partials: bool = False, grace_seconds: float = 3600) -> Collection:
    """Artifacts no version references: stage directories, their run reports, and (optionally)
    unfinished ``.partial`` work and ``.tmp`` leftovers. Anything written in the last
    ``grace_seconds`` is kept: a run still in progress has not published its version yet."""
    keep = _referenced(store)
    recent = time.time() - grace_seconds
    exports = {key for stage, key in keep if stage == "export"}
    found = Collection()
    for stage in sorted({*STAGE_OF_KEY.values(), "evaluate"}):
        for path in sorted((store.root / stage).glob("*")):
            if path.name in (".partial", ".tmp"):
                leftovers = [p for p in sorted(path.glob("*")) if p.stat().st_mtime <= recent]
                (found.removable if partials else found.partial).extend(leftovers)
            elif (stage, path.name) in keep or path.stat().st_mtime > recent:
                found.kept += 1
            else:
                found.removable.append(path)
    for run in sorted((store.root / RUNS).glob("*")):
        summary = run / "summary.json"
        export = read_json(summary).get("keys", {}).get("export") if summary.is_file() else None
        if export not in exports and run.stat().st_mtime <= recent:
            found.removable.append(run)
    found.bytes = sum(disk_bytes(p) for p in found.removable)
    return found


def gc(store: Store, dry_run: bool = True, partials: bool = False, grace_seconds: float = 3600) -> Collection:
    """Remove what :func:`collect` finds (nothing when ``dry_run``)."""
    if not (store.root / VERSIONS).is_dir():
        raise CondenseError(f"{store.root} has no published versions: nothing marks what to keep")
    found = collect(store, partials, grace_seconds)
    if not dry_run:
        for path in found.removable:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return found
