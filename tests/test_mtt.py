"""MTT on a real (tiny) digits subset: resume and divergence handling (the loss and the unroll:
tests/test_trajectory.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from condense.configure import load_config
from condense.errors import DivergenceError
from condense.stages import base
from condense.store import Store, load_arrays
from tests.conftest import TINY, Notes, kill_distillation_at_first_checkpoint, plan_for, run_jobs


def test_a_killed_distillation_resumes_matches_and_counts_both_attempts(tmp_path: Path, monkeypatch):
    cfg = load_config("digits-mtt", TINY)
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    key = plan.keys["distill"]

    kill_distillation_at_first_checkpoint(store, cfg, plan, monkeypatch)
    assert not store.has("distill", key)
    path = store.partial("distill", key) / "checkpoint.pt"
    assert base.TorchCheckpoints(path).load()["iteration"] == 2
    raw = torch.load(path, weights_only=True)
    assert raw[base.STOPWATCH]["seconds"] > 0
    assert base.STOPWATCH not in base.TorchCheckpoints(path).load()  # the stage never sees it
    # Stand in for a first attempt that had computed for 1000 s before it was killed.
    torch.save({**raw, base.STOPWATCH: {**raw[base.STOPWATCH], "seconds": 1000.0}}, path)

    notes = Notes()
    run_jobs(store, cfg, plan, {"distill"}, notes)
    assert 1000 < store.meta("distill", key)["seconds"] < 2000  # carried once, never twice
    assert any("resuming MTT from checkpoint at iteration 2/6" in n for n in notes.lines)
    resumed = load_arrays(store.path("distill", key) / "synthetic.zarr")["images"]
    assert not (store.path("distill", key) / "checkpoint.pt").exists()

    fresh = Store(tmp_path / "fresh")
    fresh_plan = plan_for(fresh, cfg)
    run_jobs(fresh, cfg, fresh_plan, {"experts", "distill"})
    assert fresh_plan.keys["distill"] == key
    uninterrupted = load_arrays(fresh.path("distill", key) / "synthetic.zarr")["images"]
    assert np.isfinite(resumed).all()
    assert resumed.tobytes() == uninterrupted.tobytes()
    assert store.meta("distill", key)["lr"] == fresh.meta("distill", key)["lr"]


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    cfg = load_config("digits-mtt", [*TINY, "distill.lr_img=1e30", "distill.checkpoint_every=1"])
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    key = plan.keys["distill"]
    with pytest.raises(DivergenceError, match="diverged at iteration .* last good checkpoint: iteration"):
        run_jobs(store, cfg, plan, {"distill"})
    state = base.TorchCheckpoints(store.partial("distill", key) / "checkpoint.pt").load()
    assert torch.isfinite(state["images"]).all()
    assert not store.has("distill", key)
