import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from condense.stages.base import stage_key
from condense.store import Store, load_arrays, save_arrays, stable_hash


def test_stage_key_depends_on_every_part():
    base = stage_key("distill", {"ipc": 1}, "code-a", {"dataset": "k1"})
    assert base == stage_key("distill", {"ipc": 1}, "code-a", {"dataset": "k1"})
    assert base != stage_key("experts", {"ipc": 1}, "code-a", {"dataset": "k1"})
    assert base != stage_key("distill", {"ipc": 2}, "code-a", {"dataset": "k1"})
    assert base != stage_key("distill", {"ipc": 1}, "code-b", {"dataset": "k1"})
    assert base != stage_key("distill", {"ipc": 1}, "code-a", {"dataset": "k2"})
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_commit_makes_an_artifact_visible_only_when_complete(tmp_path: Path):
    store = Store(tmp_path / "store")
    with store.writing("stage", "k") as tmp:
        save_arrays(tmp / "a.zarr", {"x": np.arange(6).reshape(2, 3)})
        assert not store.has("stage", "k")
        store.commit("stage", "k", tmp, {"answer": 42})
    assert store.has("stage", "k")
    assert store.meta("stage", "k")["answer"] == 42
    np.testing.assert_array_equal(
        load_arrays(store.path("stage", "k") / "a.zarr")["x"], np.arange(6).reshape(2, 3)
    )


def test_a_failed_write_leaves_the_store_as_it_was(tmp_path: Path):
    store = Store(tmp_path / "store")
    with pytest.raises(RuntimeError), store.writing("stage", "k") as tmp:
        (tmp / "half").write_text("partial")
        raise RuntimeError("crash mid-write")
    assert not store.has("stage", "k")
    assert not (tmp_path / "store").exists()


def test_a_second_commit_of_the_same_key_keeps_the_first(tmp_path: Path):
    store = Store(tmp_path)
    for value in (1, 2):
        with store.writing("stage", "k") as tmp:
            store.commit("stage", "k", tmp, {"value": value})
    assert store.meta("stage", "k")["value"] == 1
    assert not list((tmp_path / "stage" / ".tmp").glob("*"))


def _write_one(args: tuple[str, int]) -> bool:
    root, index = args
    store = Store(root)
    with store.writing("evaluate", f"k{index}") as tmp:
        store.commit("evaluate", f"k{index}", tmp, {"index": index})
    return store.has("evaluate", f"k{index}")


def test_concurrent_writers_do_not_trip_over_each_others_cleanup(tmp_path: Path):
    # Each finished write prunes the empty scaffolding (.tmp/, the stage directory) that another
    # process may be creating at that very moment; the CI once failed on exactly this race.
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_write_one, [(str(tmp_path), i) for i in range(400)], chunksize=10))
    assert all(done)
    assert not (tmp_path / "evaluate" / ".tmp").exists()
