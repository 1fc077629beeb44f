from pathlib import Path

import torch
import zarr

from condense import stages
from condense.config import load_config
from condense.prepare import prepare
from condense.store import Store
from tests.conftest import TINY, record_experts


def test_buffer_is_experts_by_snapshots_by_parameters_chunked_per_snapshot(tmp_path: Path):
    cfg = load_config("digits-mtt", TINY)
    store = Store(tmp_path)
    _, key = record_experts(store, cfg)
    array = zarr.open_array(str(store.path(stages.EXPERTS, key) / "trajectories.zarr"), mode="r")
    assert array.shape[:2] == (cfg.experts.num_experts, cfg.experts.epochs + 1)
    assert array.chunks == (1, 1, array.shape[2])
    buffer = stages.load_buffer(store, key)
    # experts start from different seeded initialisations and move every epoch
    assert not torch.equal(buffer.snapshot(0, 0), buffer.snapshot(1, 0))
    steps = [
        float((buffer.snapshot(0, e + 1) - buffer.snapshot(0, e)).norm()) for e in range(cfg.experts.epochs)
    ]
    assert all(s > 0 for s in steps)
    meta = store.meta(stages.EXPERTS, key)
    assert [r["index"] for r in meta["experts"]] == list(range(cfg.experts.num_experts))
    best = max(meta["experts"], key=lambda r: r["train_accuracy"])
    assert meta["teacher"] == best["index"]
    assert all(r["train_loss"][-1] < r["train_loss"][0] for r in meta["experts"])
    assert not (tmp_path / stages.EXPERTS / ".partial" / key).exists()


def test_a_recorded_expert_is_not_retrained(tmp_path: Path, monkeypatch):
    cfg = load_config("digits-mtt", TINY)
    store = Store(tmp_path)
    dataset_key, _ = prepare(cfg.dataset, store, cfg.ipc)
    key = stages.experts_key(cfg, dataset_key)
    stages.open_experts(store, key, cfg, dataset_key)
    first = stages.record_expert(store, key, cfg, dataset_key, 0)

    def fail(*args, **kwargs):
        raise AssertionError("expert 0 was trained twice")

    monkeypatch.setattr(stages.experts, "train_expert", fail)
    assert stages.record_expert(store, key, cfg, dataset_key, 0) == first
