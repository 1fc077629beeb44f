"""Published versions of distilled sets, `latest`, and garbage collection of unreferenced work."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from condense import versions
from condense.errors import CondenseError
from condense.store import Store, write_json


def _artifact(store: Store, stage: str, key: str, age: float = 7200) -> Path:
    path = store.path(stage, key)
    path.mkdir(parents=True)
    write_json(path / "meta.json", {"stage": stage, "key": key})
    old = time.time() - age
    os.utime(path, (old, old))
    return path


def _record(export: str, fingerprint: str = "f1", **keys: str) -> dict:
    return {
        "dataset": "digits",
        "method": "mtt",
        "ipc": 1,
        "source_fingerprint": fingerprint,
        "accuracy": {"convnet": {"mean": 90.0, "std": 1.0}},
        "keys": {"dataset": "d1", "distill": "s1", "export": export, **keys},
        "evaluations": ["e1"],
    }


def test_the_same_export_is_not_a_new_version_and_new_data_is(tmp_path: Path):
    store = Store(tmp_path)
    first, new = versions.publish(store, _record("x1"))
    assert new and first["version"] == 1
    again, new = versions.publish(store, _record("x1"))
    assert not new and again == first
    second, new = versions.publish(store, _record("x2", fingerprint="f2"))
    assert new and second["version"] == 2
    assert versions.resolve(store, "digits", "mtt", 1)["keys"]["export"] == "x2"
    assert versions.resolve(store, "digits", "mtt", 1, 1)["source_fingerprint"] == "f1"
    assert [r["version"] for r in versions.list_versions(store)] == [1, 2]
    assert [r["version"] for r in versions.list_versions(store, latest_only=True)] == [2]


def test_resolving_what_was_never_published_names_what_was(tmp_path: Path):
    store = Store(tmp_path)
    versions.publish(store, _record("x1"))
    with pytest.raises(CondenseError, match="published: digits/mtt/ipc1"):
        versions.resolve(store, "digits", "dream", 1)
    with pytest.raises(CondenseError, match=r"has versions \[1\], not 7"):
        versions.resolve(store, "digits", "mtt", 1, 7)


def test_gc_removes_only_what_no_version_references(tmp_path: Path):
    store = Store(tmp_path)
    for stage, key in [("dataset", "d1"), ("distill", "s1"), ("export", "x1"), ("evaluate", "e1")]:
        _artifact(store, stage, key)
    stale = [_artifact(store, "distill", "s0"), _artifact(store, "evaluate", "e0")]
    fresh = _artifact(store, "distill", "running", age=0)  # a run in progress has not published yet
    partial = store.partial("distill", "half")
    os.utime(partial, (time.time() - 7200,) * 2)
    with pytest.raises(CondenseError, match="no published versions"):
        versions.gc(store)
    versions.publish(store, _record("x1"))

    dry = versions.gc(store, dry_run=True)
    assert dry.removable == sorted(stale, key=lambda p: (p.parent.name, p.name)) or set(dry.removable) == set(
        stale
    )
    assert dry.partial == [partial] and all(p.exists() for p in stale)

    done = versions.gc(store, dry_run=False)
    assert not any(p.exists() for p in stale) and done.bytes > 0
    assert fresh.exists() and partial.exists()
    assert all(
        store.has(stage, key) for stage, key in [("dataset", "d1"), ("distill", "s1"), ("export", "x1")]
    )
    versions.gc(store, dry_run=False, partials=True)
    assert not partial.exists()
