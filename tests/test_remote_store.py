"""The pipeline's store on object storage.

Library level on a ``file://`` URL (fsspec's local filesystem, through the same commit protocol as
S3): machines are stores with different local caches, so anything one reads from another went
through the shared store. End to end on a real S3 API (moto's server on loopback, s3fs): the
pipeline on ``s3://``, a second machine that finds every stage cached, ``ls``/``gc``/``export`` and
``load_distilled`` on the URL.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import condense
from condense import artifacts, garbage, versions
from condense.configure import load_config
from condense.stages import execute
from condense.store import Store, load_arrays, save_arrays
from condense.store import remote as remote_store
from condense.store.remote import RemoteStore
from tests.conftest import (
    TINY,
    Notes,
    fake_key,
    kill_distillation_at_first_checkpoint,
    last_json,
    plan_for,
    record_experts,
    run_cli,
    run_jobs,
    tiny_args,
)


@pytest.fixture
def shared(tmp_path: Path):
    """A store URL and a factory of 'machines' on it (each with its own local cache)."""
    url = (tmp_path / "bucket").as_uri()
    return url, lambda name: RemoteStore(url, cache=tmp_path / f"cache-{name}")


def _write(store: Store, stage: str, key: str, value: float) -> Path:
    with store.writing(stage, key) as tmp:
        save_arrays(tmp / "a.zarr", {"x": np.full((3, 4), value, dtype=np.float32)})
        (tmp / "notes.json").write_text(json.dumps({"value": value}))
        return store.commit(stage, key, tmp, {"value": value})


def test_an_artifact_committed_on_one_machine_is_read_on_another(shared):
    url, machine = shared
    a, b = machine("a"), machine("b")
    assert not b.has("distill", "k1")
    local = _write(a, "distill", "k1", 1.0)
    assert local == a.root / "distill" / "k1"  # the writer keeps its files as its mirror

    assert b.has("distill", "k1") and b.meta("distill", "k1")["value"] == 1.0
    mirrored = b.path("distill", "k1")
    assert mirrored.is_relative_to(b.root) and mirrored != local
    assert load_arrays(mirrored / "a.zarr")["x"].tolist() == [[1.0] * 4] * 3

    marker = json.loads(Path(url.removeprefix("file://"), "distill", "k1", "meta.json").read_text())
    payload = Path(url.removeprefix("file://"), "distill", "k1", marker["payload"])
    assert sorted(marker["files"]) == sorted(
        p.relative_to(payload).as_posix() for p in payload.rglob("*") if p.is_file()
    )
    assert "meta.json" not in marker["files"] and "notes.json" in marker["files"]
    assert b.url("distill", "k1") == f"{url}/distill/k1/{marker['payload']}"


def test_the_first_commit_wins_and_the_loser_leaves_nothing(shared):
    url, machine = shared
    a, b = machine("a"), machine("b")
    _write(a, "evaluate", "k", 1.0)
    kept = _write(b, "evaluate", "k", 2.0)  # same key finished on another machine a moment later
    assert load_arrays(kept / "a.zarr")["x"][0, 0] == 1.0 and b.meta("evaluate", "k")["value"] == 1.0
    folder = Path(url.removeprefix("file://"), "evaluate", "k")
    winner = b.meta("evaluate", "k")["payload"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["meta.json", winner])
    assert not (b.root / "evaluate" / ".tmp").exists() or not any((b.root / "evaluate" / ".tmp").iterdir())


def test_an_upload_killed_before_its_marker_is_invisible_and_gc_calls_it_unfinished(shared, monkeypatch):
    url, machine = shared
    a, b = machine("a"), machine("b")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(remote_store, "create_exclusive", killed)
    with pytest.raises(KeyboardInterrupt):
        _write(a, "distill", "half", 1.0)
    monkeypatch.undo()
    assert not b.has("distill", "half") and not a.has("distill", "half")
    assert any(Path(url.removeprefix("file://"), "distill", "half").rglob("*.json"))  # the upload is there

    _write(a, "export", fake_key("x1"), 1.0)
    versions.publish(a, {"dataset": "d", "method": "m", "ipc": 1, "keys": {"export": fake_key("x1")}})
    found = garbage.collect(b, grace_seconds=0)
    assert found.partial == ["distill/half"] and found.removable == []
    garbage.gc(b, dry_run=False, partials=True, grace_seconds=0)
    assert not Path(url.removeprefix("file://"), "distill", "half").exists()
    assert b.has("export", fake_key("x1"))


def test_concurrent_publishers_on_object_storage_get_distinct_versions(shared):
    _, machine = shared
    results: list[int] = []

    def publish(i: int) -> None:
        record = {"dataset": "d", "method": "m", "ipc": 1, "keys": {"export": fake_key(f"x{i}")}}
        results.append(versions.publish(machine(str(i)), record)[0]["version"])

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    exports = [r["keys"]["export"] for r in versions.list_versions(machine("reader"))]
    assert sorted(exports) == sorted(fake_key(f"x{i}") for i in range(6))


def test_experts_recorded_on_two_machines_are_sealed_on_a_third(shared, tmp_path: Path):
    _, machine = shared
    cfg = load_config("digits-mtt", TINY)
    a, b, c = machine("a"), machine("b"), machine("c")
    plan = plan_for(a, cfg)
    part0, part1, seal = (job for job in plan.jobs if job.stage == "experts")
    records = [execute(part0, cfg, a)["meta"], execute(part1, cfg, b)["meta"]]
    again = execute(part1, cfg, c)
    assert again["meta"] == records[1] and again["cached"] is True  # found in the shared work, not retrained
    sealed = execute(seal, cfg, c)
    assert sealed["meta"]["parts"] == records
    key = seal.key

    _, local_key = record_experts(Store(tmp_path / "local"), cfg)
    assert local_key == key
    expected = artifacts.load_buffer(Store(tmp_path / "local"), key)
    for machine_store in (c, machine("d")):
        buffer = artifacts.load_buffer(machine_store, key)
        for index in range(cfg.experts.num_experts):
            for epoch in range(cfg.experts.epochs + 1):
                assert torch.equal(buffer.snapshot(index, epoch), expected.snapshot(index, epoch))


def test_a_distillation_killed_on_one_machine_resumes_on_another(shared, tmp_path: Path, monkeypatch):
    _, machine = shared
    cfg = load_config("digits-mtt", TINY)
    a, b = machine("a"), machine("b")
    plan = plan_for(a, cfg)
    run_jobs(a, cfg, plan, {"experts"})
    key = plan.keys["distill"]

    kill_distillation_at_first_checkpoint(a, cfg, plan, monkeypatch)

    notes = Notes()
    run_jobs(b, cfg, plan, {"distill"}, notes)
    assert any("resuming MTT from checkpoint at iteration 2/6" in n for n in notes.lines)
    assert not any(Path(b.base, "distill", ".partial").glob("*/*"))  # the commit cleared shared work

    fresh = Store(tmp_path / "fresh")
    run_jobs(fresh, cfg, plan_for(fresh, cfg), {"experts", "distill"})
    resumed = load_arrays(a.path("distill", key) / "synthetic.zarr")["images"]
    uninterrupted = load_arrays(fresh.path("distill", key) / "synthetic.zarr")["images"]
    assert resumed.tobytes() == uninterrupted.tobytes()


# ----------------------------------------------------------------------------- real S3 API


def test_the_pipeline_runs_on_s3_and_a_second_machine_finds_it_all_cached(s3, prefect_env, tmp_path: Path):
    env, caches = {**prefect_env, **s3}, tmp_path
    url = "s3://bucket/store"
    first = last_json(run_cli(tiny_args(url), {**env, "CONDENSE_CACHE": str(caches / "a")}).stdout)
    assert not any(stage["cached"] for stage in first["stages"].values())
    assert first["version"]["new"] and first["store"] == url
    assert first["artifacts"]["manifest"].startswith(f"{url}/export/")

    second_cache = caches / "b"
    again = last_json(run_cli(tiny_args(url), {**env, "CONDENSE_CACHE": str(second_cache)}).stdout)
    assert all(stage["cached"] for stage in again["stages"].values())
    assert again["accuracy"] == first["accuracy"] and not again["version"]["new"]
    (mirror,) = (second_cache / "stores").iterdir()
    assert not (mirror / "experts").exists()  # a cache hit reads markers, not the artifacts

    listed = run_cli(["ls", "--store", url, "--json"], env).stdout.strip().splitlines()
    assert [json.loads(line)["keys"]["export"] for line in listed] == [first["keys"]["export"]]
    dry = run_cli(["gc", "--store", url, "--dry-run", "--grace-minutes", "0"], env).stdout
    assert "would remove runs/" not in dry and "would remove 0 entries" in dry

    loaded = condense.load_distilled(url, dataset="digits", method="mtt", ipc=1)
    by_run = condense.load_distilled(first["artifacts"]["run_dir"])
    assert len(loaded) == 10 and torch.equal(loaded.images, by_run.images)
    out = tmp_path / "folder"
    run_cli(["export", url, "--dataset", "digits", "--method", "mtt", "--ipc", "1", "--to", str(out)], env)
    assert len(list(out.glob("*/*.png"))) == 10 and (out / "labels.json").is_file()


def test_a_store_url_nobody_can_open_fails_before_any_work(prefect_env, tmp_path: Path):
    proc = run_cli(
        tiny_args("foo://bucket/store"), {**prefect_env, "CONDENSE_CACHE": str(tmp_path)}, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: cannot open the store foo://bucket/store: Protocol not known: foo"
    ]
    assert not any(tmp_path.iterdir())
    for command in (["ls"], ["gc", "--dry-run"]):
        proc = run_cli([*command, "--store", "foo://bucket/store"], prefect_env, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: cannot open the store foo://")
