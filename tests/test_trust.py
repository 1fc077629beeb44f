"""Trust nothing on disk: damaged artifacts are never read as valid (they heal, or the run stops
naming them), no file in a store or an export can run code or make condense write outside where it
was told, gc never follows a link out of the store or removes what a running pipeline uses."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import condense
from condense import garbage, leases, versions
from condense.configure import load_config
from condense.convert import write_image_folder
from condense.errors import CondenseError, ConfigError, DamagedArtifactError
from condense.export import write_distilled
from condense.stages.base import Stopwatch, TorchCheckpoints
from condense.store import Store, load_arrays
from condense.teacher import load_teacher_file
from tests.conftest import TINY, Notes, fake_key, run_pipeline


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> tuple[Path, dict]:
    """A store holding one finished tiny digits-mtt run, and its summary."""
    root = tmp_path_factory.mktemp("intact")
    return root, run_pipeline(Store(root), load_config("digits-mtt", TINY))


@pytest.fixture
def copy(intact, tmp_path) -> tuple[Store, dict]:
    root, summary = intact
    shutil.copytree(root, tmp_path / "store", symlinks=True)
    return Store(tmp_path / "store"), summary


def _synthetic(store: Store, summary: dict) -> bytes:
    return load_arrays(store.path("distill", summary["keys"]["distill"]) / "synthetic.zarr")[
        "images"
    ].tobytes()


def _rerun(store: Store) -> tuple[dict, Notes]:
    notes = Notes()
    return run_pipeline(store, load_config("digits-mtt", TINY), notes), notes


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _folder(store: Store, summary: dict, stage: str) -> Path:
    return store.root / stage / summary["keys"][stage]


# ----------------------------------------------------------------------------- damaged artifacts heal


def test_deleted_trajectory_chunks_are_recomputed_not_read_as_zeros(copy, intact):
    store, summary = copy
    chunks = _files(_folder(store, summary, "experts") / "trajectories.zarr" / "c")
    for chunk in chunks[:2]:
        chunk.unlink()
    again, notes = _rerun(store)
    assert not again["stages"]["experts"]["cached"]
    assert any("trajectories.zarr/c/" in n and "is missing" in n and "recomputing" in n for n in notes.lines)
    assert again["accuracy"] == summary["accuracy"]
    assert _synthetic(store, again) == _synthetic(Store(intact[0]), summary)
    assert list((store.root / "experts" / ".damaged").iterdir())  # the bad copy is kept aside


@pytest.mark.parametrize(
    ("stage", "damage"),
    [
        ("distill", "truncate a chunk"),
        ("distill", "delete meta.json"),
        ("distill", "garble meta.json"),
        ("distill", "alter meta.json"),
        ("distill", "delete every chunk"),
        ("teacher", "truncate weights"),
        ("export", "truncate a shard"),
    ],
)
def test_damage_of_any_kind_heals_to_the_intact_result(copy, intact, stage, damage):
    store, summary = copy
    folder = _folder(store, summary, stage)
    meta = folder / "meta.json"
    if damage == "truncate a chunk":
        chunk = _files(folder / "synthetic.zarr" / "images" / "c")[0]
        chunk.write_bytes(chunk.read_bytes()[:-7])
    elif damage == "delete meta.json":
        meta.unlink()
    elif damage == "garble meta.json":
        meta.write_bytes(meta.read_bytes()[:40])
    elif damage == "alter meta.json":  # valid JSON, a learned lr that would train at 5.0
        meta.write_text(meta.read_text().replace('"lr": ', '"lr": 5.0, "was": '))
        assert json.loads(meta.read_text())["lr"] == 5.0
    elif damage == "delete every chunk":
        shutil.rmtree(folder / "synthetic.zarr" / "images" / "c")
    elif damage == "truncate weights":
        weights = folder / "weights.pt"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        shard = next(folder.glob("*.tar"))
        shard.write_bytes(shard.read_bytes()[:1024])
    again, _ = _rerun(store)
    assert not again["stages"][stage]["cached"]
    assert again["accuracy"] == summary["accuracy"] and again["learned_lr"] == summary["learned_lr"]
    assert _synthetic(store, again) == _synthetic(Store(intact[0]), summary)
    assert len(condense.load_distilled(again["artifacts"]["run_dir"])) == 10


def test_a_flipped_byte_is_caught_when_the_artifact_is_read(copy):
    store, summary = copy
    weights = _folder(store, summary, "teacher") / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF  # same size: only the content hash sees it
    weights.write_bytes(bytes(data))
    store.verify("teacher", summary["keys"]["teacher"])  # sizes alone pass
    with pytest.raises(DamagedArtifactError, match=r"teacher/\w+ is damaged: weights.pt does not hold"):
        Store(store.root).path("teacher", summary["keys"]["teacher"])
    assert not weights.exists()  # moved aside: the next run trains or picks it again
    checked, damaged = garbage.verify(store)
    assert checked > 5 and damaged == []


def test_verify_reports_every_damaged_artifact(copy):
    store, summary = copy
    chunk = _files(_folder(store, summary, "dataset") / "data.zarr" / "train_x" / "c")[0]
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    checked, damaged = garbage.verify(store)
    assert len(damaged) == 1 and f"dataset/{summary['keys']['dataset']} is damaged" in damaged[0]
    garbage.verify(store, move_aside=True)
    assert not _folder(store, summary, "dataset").exists()


def test_verify_names_a_link_planted_inside_an_artifact_and_refuses_a_store_that_is_not_there(copy, tmp_path):
    store, summary = copy
    (tmp_path / "secret").write_text("not the store's")
    (_folder(store, summary, "teacher") / "planted").symlink_to(tmp_path / "secret")
    checked, damaged = garbage.verify(store)
    assert len(damaged) == 1 and "planted is a link, not part of it" in damaged[0]
    with pytest.raises(CondenseError, match="no store at .*typo: nothing to verify"):
        garbage.verify(Store(tmp_path / "typo"))


def test_load_distilled_refuses_a_shard_that_does_not_match_its_manifest(copy):
    store, summary = copy
    export = Path(summary["artifacts"]["manifest"]).parent.name
    lone = store.root.parent / "lone"
    shutil.copytree(store.root / "export" / export, lone)  # an export copied elsewhere, no store around
    shard = next(lone.glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CondenseError, match="is damaged: distilled-000000.tar does not match its manifest"):
        condense.load_distilled(lone)
    manifest = json.loads((lone / "manifest.json").read_text())
    manifest["num_samples"] = 11
    del manifest["shard_sha256"]
    (lone / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(store.root / "export" / export / shard.name, shard)
    with pytest.raises(CondenseError, match=r"manifest.json lacks its checks \(shard_sha256\)"):
        condense.load_distilled(lone)  # a manifest that checks nothing is refused, unless told
    with pytest.raises(CondenseError, match="10 samples, its manifest lists 11"):
        condense.load_distilled(lone, verify=False)


def test_a_copied_store_reads_its_own_files_through_its_run_folder(copy, intact):
    store, summary = copy
    shutil.rmtree(intact[0] / "export")  # the original's export is gone: the copy must not need it
    try:
        run_dir = store.root / "runs" / summary["run_id"]
        assert len(condense.load_distilled(run_dir)) == 10
    finally:
        shutil.copytree(store.root / "export", intact[0] / "export")


def test_an_unreadable_checkpoint_is_set_aside_and_the_work_starts_over(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    notes = Notes()
    assert TorchCheckpoints(path, progress=notes).load() is None
    assert not path.exists() and any("does not load" in n for n in notes.lines)


def test_a_checkpoint_carries_its_seconds_to_later_attempts_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    first = Stopwatch(carried=50.0)
    TorchCheckpoints(path, stopwatch=first).save({"iteration": 3})
    assert TorchCheckpoints(path, stopwatch=first).load() == {"iteration": 3}
    assert first.carried == 50.0  # its own checkpoint: nothing carried twice
    later = Stopwatch()
    assert TorchCheckpoints(path, stopwatch=later).load() == {"iteration": 3}
    assert later.carried >= 50.0


# ----------------------------------------------------------------------------- nothing runs code


class Canary:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the planted files
def test_no_pickle_in_a_store_or_a_teacher_file_is_ever_loaded(copy, tmp_path):
    import pickle

    store, summary = copy
    canary = tmp_path / "canary"
    payload = pickle.dumps(Canary(canary))
    # Where Prefect used to keep task results, under every name a record could have.
    results = store.root / "_prefect_results"
    results.mkdir()
    for stage, key in summary["keys"].items():
        for name in (key, f"{stage}-{key}", f"stage-{key}"):
            (results / name).write_bytes(payload)
    # The checkpoint a distillation resumes from.
    key = summary["keys"]["distill"]
    shutil.rmtree(store.root / "distill" / key)
    (store.partial("distill", key) / "checkpoint.pt").write_bytes(payload)
    (tmp_path / "teacher.pt").write_bytes(payload)
    with pytest.raises(ConfigError, match="not a readable state_dict"):
        load_teacher_file(tmp_path / "teacher.pt", torch.nn.Linear(2, 2))
    again, notes = _rerun(store)
    assert not canary.exists()
    assert not again["stages"]["distill"]["cached"] and any("does not load" in n for n in notes.lines)
    assert again["accuracy"] == summary["accuracy"]


# ----------------------------------------------------------------------------- export writes only into --to


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _export(folder: Path, classes: list[str]) -> Path:
    images = np.zeros((2, 1, 4, 4), dtype=np.float32)
    manifest = {"method": "m", "ipc": 1, "classes": classes, "source_fingerprint": "f"}
    write_distilled(folder, images, images, np.array([0, 1]), None, manifest)
    return folder


def test_class_names_cannot_lead_export_out_of_its_folder(tmp_path):
    source = _export(tmp_path / "export", ["../../../escaped", "/etc/abs"])
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    write_image_folder(source, out)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["_.._.._escaped/000000.png", "_etc_abs/000001.png"]
    assert {p for p in tmp_path.rglob("*") if out not in p.parents} - before == {tmp_path / "deep", out}
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == ["../../../escaped", "/etc/abs"]  # the names themselves are kept


def test_a_shard_member_named_with_dots_is_refused_and_nothing_is_written(tmp_path):
    source = _export(tmp_path / "export", ["a", "b"])
    shard = next(source.glob("*.tar"))
    _tar(shard, {"../../evil.png": b"x", "../../evil.cls": b"0"})
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["shard_sha256"][shard.name] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest["shard_bytes"][shard.name] = shard.stat().st_size
    manifest["num_samples"] = 1
    (source / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    with pytest.raises(CondenseError, match="not a plain sample key"):
        write_image_folder(source, out)
    assert not out.exists() and not (tmp_path / "evil.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_refuses_a_non_empty_folder_unless_told_and_never_mixes(tmp_path):
    source = _export(tmp_path / "export", ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("mine")
    with pytest.raises(CondenseError, match="is not empty; pass --overwrite"):
        write_image_folder(source, out)
    assert (out / "old.txt").read_text() == "mine"
    write_image_folder(source, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "labels.json").is_file()
    with pytest.raises(CondenseError, match="is a file"):
        write_image_folder(source, out / "labels.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]  # no staging left behind


# ----------------------------------------------------------------------------- gc


def _published(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    versions.publish(
        store,
        {
            "dataset": "d",
            "method": "m",
            "ipc": 1,
            "source_fingerprint": "f",
            "accuracy": {},
            "keys": {"export": fake_key("x")},
        },
    )
    return store


def _old(path: Path) -> None:
    old = time.time() - 7200
    for entry in [*path.rglob("*"), path]:
        os.utime(entry, (old, old), follow_symlinks=False)


def test_gc_never_follows_a_link_out_of_the_store(tmp_path):
    store = _published(tmp_path)
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "data.bin").write_bytes(b"keep me")
    (outside / "file.bin").write_bytes(b"keep me too")
    (store.root / "distill").mkdir()
    (store.root / "distill" / ".partial").symlink_to(outside, target_is_directory=True)
    (store.root / "teacher").mkdir()
    (store.root / "teacher" / "abc").symlink_to(outside, target_is_directory=True)
    _old(store.root)
    found = garbage.gc(store, dry_run=False, partials=True, grace_seconds=0)
    assert sorted(found.removable) == ["distill/.partial", "teacher/abc"]
    assert (outside / "sub" / "data.bin").read_bytes() == b"keep me" and (outside / "file.bin").exists()
    assert (
        not (store.root / "distill" / ".partial").exists() and not (store.root / "teacher" / "abc").exists()
    )


def test_gc_keeps_what_a_running_pipeline_leases_and_only_while_it_runs(copy):
    store, summary = copy
    _old(store.root)
    shutil.rmtree(store.root / "versions")
    store.fs.invalidate_cache()
    versions.publish(store, {"dataset": "d", "method": "m", "ipc": 1, "keys": {"export": fake_key("other")}})
    dataset = ("dataset", summary["keys"]["dataset"])
    with leases.Lease(store, "run-1") as lease:
        lease.protect([dataset])
        garbage.gc(store, dry_run=False, grace_seconds=0)
        assert store.has(*dataset) and not store.has("distill", summary["keys"]["distill"])
    assert not (store.root / "leases").exists()  # the run's lease ends with it
    stale = {"run_id": "gone", "refreshed": time.time() - leases.STALE_SECONDS - 1, "keys": [list(dataset)]}
    (store.root / "leases").mkdir()
    (store.root / "leases" / "gone.json").write_text(json.dumps(stale))
    garbage.gc(store, dry_run=False, grace_seconds=0)
    assert not store.has(*dataset)  # a run killed long ago protects nothing


# ------------------------------------------------------------- names read from a store never become paths


def _crafted_version(store: Store, summary: dict, **keys: str) -> None:
    """A version 2 of the run's published set whose keys say what an attacker wants."""
    series = store.root / "versions" / "digits" / "mtt" / "ipc1"
    latest = json.loads(sorted(series.glob("v*.json"))[-1].read_text())
    (series / "v0002.json").write_text(
        json.dumps({**latest, "version": 2, "keys": {**latest["keys"], **keys}})
    )


@pytest.mark.parametrize("key", ["../../victim", "../../../../../../../../tmp", "/etc", "a/b", ".."])
def test_a_crafted_version_record_never_moves_or_reads_a_folder_outside_the_store(copy, tmp_path, key):
    store, summary = copy
    victim = tmp_path / "victim"  # beside the store, where "../../victim" leads from <store>/export/
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    _crafted_version(store, summary, export=key)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CondenseError, match=r"v0002.json: export key .* is not a stage key"):
        condense.load_distilled(store.root, dataset="digits", method="mtt", ipc=1)
    with pytest.raises(CondenseError, match="is not a stage key"):
        write_image_folder(str(store.root), tmp_path / "out", "digits", "mtt", 1, "latest", False)
    with pytest.raises(CondenseError, match="is not a stage key"):
        garbage.gc(store, dry_run=True)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made, nothing moved


def test_a_stage_key_that_is_a_link_out_of_the_store_is_set_aside_not_followed(copy, tmp_path):
    store, summary = copy
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    key = fake_key("linked")
    (store.root / "export" / key).symlink_to(outside, target_is_directory=True)
    _crafted_version(store, summary, export=key)
    with pytest.raises(CondenseError):
        condense.load_distilled(store.root, dataset="digits", method="mtt", ipc=1)
    # The link itself went aside inside the store; what it pointed at is where it was.
    assert (outside / "precious.txt").read_text() == "keep me"
    assert not (store.root / "export" / key).is_symlink()
    assert [p.is_symlink() for p in (store.root / "export" / ".damaged").iterdir()] == [True]


def test_store_paths_refuse_names_that_climb(tmp_path):
    store = Store(tmp_path / "store")
    for stage, key in [("export", "../x"), ("..", "k"), ("export", "/etc"), ("export", ".hidden")]:
        with pytest.raises(CondenseError, match="is not a plain name"):
            store.path(stage, key)
        with pytest.raises(CondenseError, match="is not a plain name"):
            store.quarantine(stage, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../X", "a/b", ".hidden", ""])
def test_a_dataset_name_that_would_climb_out_of_the_versions_folder_is_refused(name):
    with pytest.raises(ConfigError, match="not a plain name"):
        load_config("digits-mtt", [f"dataset.name={name!r}"])


def test_a_dataset_without_a_name_is_named_after_its_folder_not_digits(tmp_path):
    cfg = load_config("digits-mtt", ["dataset.source=webdataset", f"dataset.path={tmp_path / 'cifar100'}"])
    assert cfg.dataset.name == "cifar100"
    with pytest.raises(ConfigError, match="name is needed for source webdataset"):
        load_config("digits-mtt", ["dataset.source=webdataset", "dataset.path=/"])


def test_a_small_shard_that_inflates_past_its_declared_size_is_refused_before_it_is_resident(tmp_path):
    import gzip

    source = _export(tmp_path / "export", ["a", "b"])
    shard = next(source.glob("*.tar"))
    # A self-consistent manifest around a gzip bomb: 64 MB of zeros in a member, 64 KB on disk.
    _tar(shard, {"000000.input.npy": bytes(64 << 20), "000000.cls": b"0"})
    bomb = source / "distilled-000000.tar.gz"
    bomb.write_bytes(gzip.compress(shard.read_bytes()))
    shard.unlink()
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["shards"] = [bomb.name]
    manifest["shard_sha256"] = {bomb.name: hashlib.sha256(bomb.read_bytes()).hexdigest()}
    manifest["shard_bytes"] = {bomb.name: 1 << 20}  # what it claims to hold
    manifest["num_samples"] = 1
    (source / "manifest.json").write_text(json.dumps(manifest))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CondenseError, match="inflates past the 1048576 bytes its manifest declares"):
        condense.load_distilled(source)
    manifest["shard_bytes"] = {bomb.name: 128 << 20}  # honest about its size, but over the cap
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CondenseError, match="over the cap of 1000000 bytes"):
        condense.load_distilled(source, max_bytes=1_000_000)
    manifest["shard_bytes"] = {bomb.name: "a lot"}  # not a size: one line, not a traceback
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CondenseError, match="shard_bytes must give each shard's size in bytes"):
        condense.load_distilled(source)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"000000.input.npy": None, "000000.png": b"x", "000000.cls": b"abc"}, "000000 has cls b'abc'"),
        ({"000000.input.npy": None, "000000.cls": b"0"}, "000000 has no png field"),
        (
            {"000000.input.npy": b"not npy", "000000.png": b"x", "000000.cls": b"0"},
            "input.npy is not an array",
        ),
    ],
)
def test_a_bad_field_of_an_exported_sample_is_one_line_naming_the_sample(tmp_path, members, message):
    source = _export(tmp_path / "export", ["a", "b"])
    shard = next(source.glob("*.tar"))
    array = io.BytesIO()
    np.save(array, np.zeros((1, 4, 4), dtype=np.float32))
    _tar(shard, {name: array.getvalue() if data is None else data for name, data in members.items()})
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["shard_sha256"][shard.name] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest["shard_bytes"][shard.name] = shard.stat().st_size
    manifest["num_samples"] = 1
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CondenseError, match=message):
        if "png" in message:
            write_image_folder(source, tmp_path / "out")
        else:
            condense.load_distilled(source)


def _committed_elsewhere(tmp_path: Path) -> Store:
    """A store with one committed artifact ``chunks/<key>`` that this process has not checked yet
    (committing marks it checked, so it is committed in one folder and read from a copy)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "chunk.bin").write_bytes(b"\x01" * 64)
    Store(tmp_path / "first").commit("chunks", fake_key("chunk"), work, {})
    shutil.copytree(tmp_path / "first", tmp_path / "store")
    return Store(tmp_path / "store")


def test_a_damage_check_that_raced_a_fresh_commit_moves_nothing(tmp_path, monkeypatch):
    # The first look saw damage (a read racing another job's set-aside or commit), but the artifact
    # is intact when checked again: it is read, not moved aside.
    store, key = _committed_elsewhere(tmp_path), fake_key("chunk")
    intact_verify, looks = store.verify, []

    def first_look_sees_damage(stage, key, hash_up_to=0):
        looks.append(stage)
        if len(looks) == 1:
            raise DamagedArtifactError(stage, key, "chunk.bin is missing")
        intact_verify(stage, key, hash_up_to)

    monkeypatch.setattr(store, "verify", first_look_sees_damage)
    assert store.path("chunks", key) == store.root / "chunks" / key
    assert (store.root / "chunks" / key / "chunk.bin").is_file()
    assert not (store.root / "chunks" / ".damaged").exists()
    assert looks == ["chunks", "chunks"]


def test_two_jobs_that_find_one_damaged_artifact_move_it_aside_once_and_say_where_it_went(tmp_path):
    store, key = _committed_elsewhere(tmp_path), fake_key("chunk")
    (store.root / "chunks" / key / "chunk.bin").write_bytes(b"\x02" * 64)  # same size, other bytes
    first = store.set_aside_if_damaged("chunks", key, float("inf"))
    second = store.set_aside_if_damaged("chunks", key, float("inf"))
    assert first is not None and first.moved_to is not None and Path(first.moved_to).is_dir()
    assert first.problem == "chunk.bin does not hold what was written (sha256 differs)"
    assert second is not None and second.moved_to is None
    assert "another job moved it aside" in str(second)
    assert len(list((store.root / "chunks" / ".damaged").iterdir())) == 1
