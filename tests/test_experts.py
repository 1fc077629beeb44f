from pathlib import Path

import torch
import zarr

from condense import artifacts
from condense.configure import load_config
from condense.stages import execute
from condense.stages import experts as experts_stage
from condense.store import Store
from tests.conftest import TINY, plan_for, record_experts


def test_buffer_is_experts_by_snapshots_by_parameters_chunked_per_snapshot(tmp_path: Path):
    cfg = load_config("digits-mtt", TINY)
    store = Store(tmp_path)
    _, key = record_experts(store, cfg)
    array = zarr.open_array(str(store.path("experts", key) / "trajectories.zarr"), mode="r")
    assert array.shape[:2] == (cfg.experts.num_experts, cfg.experts.epochs + 1)
    assert array.chunks == (1, 1, array.shape[2])
    buffer = artifacts.load_buffer(store, key)
    # experts start from different seeded initialisations and move every epoch
    assert not torch.equal(buffer.snapshot(0, 0), buffer.snapshot(1, 0))
    steps = [
        float((buffer.snapshot(0, e + 1) - buffer.snapshot(0, e)).norm()) for e in range(cfg.experts.epochs)
    ]
    assert all(s > 0 for s in steps)
    meta = store.meta("experts", key)
    assert [r["index"] for r in meta["parts"]] == list(range(cfg.experts.num_experts))
    best = max(meta["parts"], key=lambda r: r["train_accuracy"])
    assert meta["teacher"] == best["index"]
    assert all(r["train_loss"][-1] < r["train_loss"][0] for r in meta["parts"])
    assert not (tmp_path / "experts" / ".partial" / key).exists()
    assert not list(store.path("experts", key).glob("part-*.json"))  # scratch records are not sealed


def test_a_recorded_expert_is_not_retrained(tmp_path: Path, monkeypatch):
    cfg = load_config("digits-mtt", TINY)
    store = Store(tmp_path)
    first_part = next(job for job in plan_for(store, cfg).jobs if job.part == 0)
    first = execute(first_part, cfg, store)
    assert first["cached"] is False and not store.has("experts", first_part.key)

    def fail(*args, **kwargs):
        raise AssertionError("expert 0 was trained twice")

    monkeypatch.setattr(experts_stage, "train_expert", fail)
    again = execute(first_part, cfg, store)
    assert again["meta"] == first["meta"] and again["cached"] is True
