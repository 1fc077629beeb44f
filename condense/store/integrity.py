"""Every artifact says what it holds: at commit, each file's size and sha256 go into its meta.json,
with a digest of the meta itself; reads check them, so a deleted chunk, a truncated file, a flipped
byte or an edited meta.json is never read as valid.

Sizes are always checked (a stat per file); content hashes whenever an artifact is read whole by a
process, up to ``$CONDENSE_VERIFY_MAX_BYTES`` (1 GiB by default; larger artifacts, such as paper-scale
expert buffers read a snapshot at a time, get sizes only there, and everything from
``condense verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from condense.store.files import META
from condense.store.names import COMPONENT

INFRASTRUCTURE = "the store: checksums of what was written"

CHECKSUMS = "checksums"
DIGEST = "digest"
_CHUNK = 1 << 20


def content_limit() -> int:
    return int(os.environ.get("CONDENSE_VERIFY_MAX_BYTES", 1 << 30))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Relative names of every regular file under ``folder`` but the meta (links are not followed)."""
    names = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(folder).as_posix()
            if relative != META and not path.is_symlink():
                names.append(relative)
    return sorted(names)


def checksums(folder: Path) -> dict[str, list[Any]]:
    """{relative name: [size, sha256]} of every file an artifact holds."""
    return {name: [(folder / name).stat().st_size, sha256_file(folder / name)] for name in _files(folder)}


def _digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it will read back from JSON, with its digest."""
    plain = json.loads(json.dumps(meta, default=str))
    return {**plain, DIGEST: _digest(plain)}


def parse_meta(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) when ``raw`` is an intact meta.json, else (None, what is wrong)."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{META} is not valid JSON ({err.__class__.__name__})"
    if not isinstance(meta, dict) or CHECKSUMS not in meta or DIGEST not in meta:
        return None, f"{META} has no checksums (not written by this version of condense)"
    if meta[DIGEST] != _digest(meta):
        return None, f"{META} was altered after it was written"
    return meta, None


def problem(folder: Path, meta: dict[str, Any], hash_up_to: float) -> str | None:
    """What is wrong with the files of a committed artifact (None: they are as recorded). Contents
    are hashed when the artifact holds at most ``hash_up_to`` bytes (0: sizes only)."""
    recorded: dict[str, list[Any]] = meta[CHECKSUMS]
    for name, (size, _) in sorted(recorded.items()):
        if not all(COMPONENT.fullmatch(part) for part in name.split("/")):
            return f"{META} records {name!r}, not a file inside the artifact"
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    extra = sorted(set(_files(folder)) - set(recorded))
    if extra:
        return f"{extra[0]} was not part of it"
    link = next((p for p in sorted(folder.rglob("*")) if p.is_symlink()), None)
    if link is not None:  # condense writes none; a reader following one would read outside the store
        return f"{link.relative_to(folder).as_posix()} is a link, not part of it"
    if sum(size for size, _ in recorded.values()) <= hash_up_to:
        for name, (_, sha) in sorted(recorded.items()):
            if sha256_file(folder / name) != sha:
                return f"{name} does not hold what was written (sha256 differs)"
    return None
