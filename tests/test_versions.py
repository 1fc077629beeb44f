"""Published versions of distilled sets, `latest`, and garbage collection of unreferenced work."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from condense import garbage, versions
from condense.errors import CondenseError
from condense.store import Store, write_json
from tests.conftest import fake_key

D1, S1, E1, X1, X2, S0, E0 = map(fake_key, ["d1", "s1", "e1", "x1", "x2", "s0", "e0"])


def _artifact(store: Store, stage: str, key: str, age: float = 7200) -> Path:
    path = store.root / stage / key
    path.mkdir(parents=True)
    write_json(path / "meta.json", {"stage": stage, "key": key})
    old = time.time() - age
    for entry in (path / "meta.json", path):
        os.utime(entry, (old, old))
    return path


def _record(export: str, fingerprint: str = "f1", **keys: str) -> dict:
    return {
        "dataset": "digits",
        "method": "mtt",
        "ipc": 1,
        "source_fingerprint": fingerprint,
        "accuracy": {"convnet": {"mean": 90.0, "std": 1.0}},
        "keys": {"dataset": D1, "distill": S1, "export": export, **keys},
        "evaluations": [E1],
    }


def test_the_same_export_is_not_a_new_version_and_new_data_is(tmp_path: Path):
    store = Store(tmp_path)
    first, new = versions.publish(store, _record(X1))
    assert new and first["version"] == 1
    again, new = versions.publish(store, _record(X1))
    assert not new and again == first
    second, new = versions.publish(store, _record(X2, fingerprint="f2"))
    assert new and second["version"] == 2
    assert versions.resolve(store, "digits", "mtt", 1)["keys"]["export"] == X2
    assert versions.resolve(store, "digits", "mtt", 1, 1)["source_fingerprint"] == "f1"
    assert [r["version"] for r in versions.list_versions(store)] == [1, 2]
    assert [r["version"] for r in versions.list_versions(store, latest_only=True)] == [2]


def test_resolving_what_was_never_published_names_what_was(tmp_path: Path):
    store = Store(tmp_path)
    versions.publish(store, _record(X1))
    with pytest.raises(CondenseError, match="published: digits/mtt/ipc1"):
        versions.resolve(store, "digits", "dream", 1)
    with pytest.raises(CondenseError, match=r"has versions \[1\], not 7"):
        versions.resolve(store, "digits", "mtt", 1, 7)


def test_gc_removes_only_what_no_version_references(tmp_path: Path):
    store = Store(tmp_path)
    for stage, key in [("dataset", D1), ("distill", S1), ("export", X1), ("evaluate", E1)]:
        _artifact(store, stage, key)
    stale = [_artifact(store, "distill", S0), _artifact(store, "evaluate", E0)]
    fresh = _artifact(store, "distill", "running", age=0)  # a run in progress has not published yet
    partial = store.partial("distill", "half")
    os.utime(partial, (time.time() - 7200,) * 2)
    with pytest.raises(CondenseError, match="no published versions"):
        garbage.gc(store)
    versions.publish(store, _record(X1))

    dry = garbage.gc(store, dry_run=True)
    assert dry.removable == [f"distill/{S0}", f"evaluate/{E0}"]
    assert dry.partial == ["distill/.partial/half"] and all(p.exists() for p in stale)

    done = garbage.gc(store, dry_run=False)
    assert not any(p.exists() for p in stale) and done.bytes > 0
    assert fresh.exists() and partial.exists()
    assert all(store.has(stage, key) for stage, key in [("dataset", D1), ("distill", S1), ("export", X1)])
    garbage.gc(store, dry_run=False, partials=True)
    assert not partial.exists()


def test_a_store_copied_to_object_storage_loads_by_url(tmp_path: Path):
    import fsspec
    import numpy as np
    import torch

    import condense
    from condense.export import write_distilled

    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    soft = np.full((4, 2), 0.5, dtype=np.float32)
    manifest = {"method": "mtt", "ipc": 2, "classes": [0, 1], "source_fingerprint": "f1"}
    with store.writing("export", X1) as tmp:
        write_distilled(tmp, images, images.clip(0, 1), np.array([0, 0, 1, 1]), soft, manifest)
        store.commit("export", X1, tmp, {})
    versions.publish(store, _record(X1))
    local = condense.load_distilled(store.root, dataset="digits", method="mtt", ipc=1)

    fs = fsspec.filesystem("memory")
    for path in store.root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/bucket/{path.relative_to(store.root)}", path.read_bytes())
    remote = condense.load_distilled("memory://bucket", dataset="digits", method="mtt", ipc=1, version=1)
    assert torch.equal(remote.images, local.images) and torch.equal(remote.soft, local.soft)
    assert remote.labels.tolist() == [0, 0, 1, 1]
    direct = condense.load_distilled(f"memory://bucket/export/{X1}/manifest.json")
    assert torch.equal(direct.images, torch.from_numpy(images))
    with pytest.raises(
        CondenseError, match="no distilled set digits/dm/ipc1 in memory://bucket; published: digits/mtt/ipc1"
    ):
        condense.load_distilled("memory://bucket", dataset="digits", method="dm", ipc=1)
    with pytest.raises(CondenseError, match="expected manifest.json"):
        condense.load_distilled("memory://bucket/nowhere")


def _run_folder(store: Store, run_id: str, export: str, age: float = 7200, dataset: str = "digits") -> Path:
    folder = store.root / "runs" / run_id
    folder.mkdir(parents=True)
    summary = {"run_id": run_id, "dataset": dataset, "method": "mtt", "ipc": 1, "keys": {"export": export}}
    write_json(folder / "summary.json", summary)
    old = time.time() - age
    for entry in (folder / "summary.json", folder):
        os.utime(entry, (old, old))
    return folder


def test_gc_keeps_the_newest_runs_of_each_published_set_and_names_damaged_ones(tmp_path: Path):
    store = Store(tmp_path)
    _artifact(store, "export", X1)
    versions.publish(store, _record(X1))
    # Twelve nightly cached reruns of one published set, and one of another dataset's.
    runs = [_run_folder(store, f"20261201-0000{i:02d}-aaaaaa", X1) for i in range(12)]
    other = _run_folder(store, "20261101-000000-bbbbbb", X1, dataset="cifar10")
    running = _run_folder(store, "20261202-000000-cccccc", X1, age=0)  # still within the grace period
    broken = _run_folder(store, "20261130-000000-dddddd", X1)
    (broken / "summary.json").write_text("{not json")
    found = garbage.gc(store, dry_run=True, keep_runs=10)
    assert found.removable == [f"runs/{r.name}" for r in runs[:3]]  # the newest ten of 13 stay
    unreadable = f"runs/{broken.name}/summary.json is unreadable: kept; remove the folder by hand"
    assert found.damaged == [unreadable]
    garbage.gc(store, dry_run=False, keep_runs=10)
    assert [r.exists() for r in runs] == [False] * 3 + [True] * 9
    assert other.exists() and running.exists() and broken.exists()
    with pytest.raises(CondenseError, match="keep_runs must be at least 1"):
        garbage.gc(store, keep_runs=0)


def test_gc_removes_the_stale_lease_of_a_killed_run_and_keeps_a_live_one(tmp_path: Path):
    from condense import leases

    store = Store(tmp_path)
    versions.publish(store, _record(X1))
    with leases.Lease(store, "live") as live:
        live.protect([("distill", S1)])
        stale = store.root / leases.LEASES / "killed.json"
        write_json(stale, {"refreshed": time.time() - 7200, "keys": [["distill", S0]]})
        old = time.time() - 7200
        os.utime(stale, (old, old))
        found = garbage.gc(store, dry_run=False)
        assert found.removable == ["leases/killed.json"] and not stale.exists()
        assert (store.root / leases.LEASES / "live.json").exists()


def test_a_leaderboard_record_without_its_artifacts_stops_gc_with_one_line(tmp_path: Path):
    store = Store(tmp_path)
    versions.publish(store, _record(X1))
    series = store.root / "leaderboards" / "digits" / "board"
    series.mkdir(parents=True)
    write_json(series / "v0001.json", {"version": 1, "name": "board", "dataset": "digits"})
    with pytest.raises(CondenseError, match="leaderboard record digits/board v1 is damaged"):
        garbage.gc(store, dry_run=True)
    (series / "v0001.json").write_text('{"version": 1, "name": "bo')  # cut short
    with pytest.raises(CondenseError, match=r"leaderboard record \S+/board/v0001.json is damaged"):
        garbage.gc(store, dry_run=True)


def test_gc_removes_idle_lock_files_and_leaves_a_held_one(tmp_path: Path):
    import threading

    store = Store(tmp_path)
    versions.publish(store, _record(X1))
    for name in (S0, S1):
        with store.lock("distill", name):
            pass
    locks = store.root / "distill" / ".locks"
    old = time.time() - 7200
    for path in locks.iterdir():
        os.utime(path, (old, old))
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.lock("distill", S1):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    try:
        found = garbage.gc(store, dry_run=False)
    finally:
        release.set()
        thread.join()
    assert found.removable == [f"distill/.locks/{S0}.lock"]  # the held one is neither gone nor said to be
    assert not (locks / f"{S0}.lock").exists() and (locks / f"{S1}.lock").exists()  # held: kept


def test_a_lock_whose_file_gc_removed_while_it_waited_is_taken_on_the_new_file(tmp_path: Path, monkeypatch):
    import fcntl

    from condense.store import local

    store = Store(tmp_path)
    path = store.root / "distill" / ".locks" / f"{S0}.lock"
    calls = []
    real_flock = fcntl.flock

    def flock(handle, operation):  # the first wait ends after gc took the file away
        calls.append(operation)
        real_flock(handle, operation)
        if operation == fcntl.LOCK_EX and calls.count(fcntl.LOCK_EX) == 1:
            path.unlink()

    monkeypatch.setattr(local.fcntl, "flock", flock)
    with store.lock("distill", S0):
        assert path.exists()  # the lock held is the file at the path, made again
    assert calls.count(fcntl.LOCK_EX) == 2
