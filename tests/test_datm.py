"""MTT's successors on a tiny digits run: DATM's moving window and learned labels (stored, exported,
trained on by the evaluation), FTD's moving average, resume, and the one-line config errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from condense import artifacts
from condense import evaluate as evaluate_lib
from condense.configure import load_config
from condense.distilled import load_distilled
from condense.errors import ConfigError
from condense.methods import configure
from condense.methods import mtt as mtt_module
from condense.methods.base import DistillInputs
from condense.methods.initial import initial_images
from condense.methods.trajectory import shallow_cut
from condense.models import FlatParams
from condense.prepare import load
from condense.stages import base
from condense.store import Store
from condense.training import student_model
from tests.conftest import TINY, Notes, kill_distillation_at_first_checkpoint, plan_for, run_jobs

# DATM on TINY's 4-epoch experts: the window starts at 0..0 and reaches 0..2 after 4 iterations.
DATM_TINY = [*TINY, "ipc=2", "distill.initial_max_start_epoch=0", "distill.window_growth_iterations=4"]


@pytest.fixture(scope="module")
def datm_run(tmp_path_factory):
    """A whole tiny DATM pipeline (without Prefect): store, config, plan."""
    store = Store(tmp_path_factory.mktemp("datm"))
    cfg = load_config("digits-datm", DATM_TINY)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts", "distill"})
    return store, cfg, plan


def test_the_window_moves_from_easy_to_late_start_epochs(datm_run):
    store, _, plan = datm_run
    history = artifacts.load_synthetic(store, plan.keys["distill"]).history
    starts = [h["start_epoch"] for h in history]
    assert starts[0] == 0  # iteration 1: window 0..0
    assert all(0 <= s <= 2 for s in starts)
    assert max(starts[3:]) > 0  # the grown window is used


def test_learned_labels_start_at_the_experts_logits_and_move(tmp_path, monkeypatch):
    store = Store(tmp_path)
    cfg = load_config("digits-datm", DATM_TINY)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    initial = {}
    original = mtt_module.expert_logits

    def recorded(*args):
        initial["logits"] = original(*args).clone()
        return original(*args)

    monkeypatch.setattr(mtt_module, "expert_logits", recorded)
    run_jobs(store, cfg, plan, {"distill"})
    learned = artifacts.load_synthetic(store, plan.keys["distill"]).label_logits
    assert learned is not None and learned.shape == (20, 10)
    assert not torch.equal(learned, initial["logits"])  # the labels received gradients and moved
    assert (learned.argmax(1) == torch.arange(10).repeat_interleave(2)).float().mean() > 0.5


def test_the_evaluation_trains_on_the_learned_labels(datm_run, monkeypatch):
    store, cfg, plan = datm_run
    seen = {}
    original = evaluate_lib.train_and_test_seeds

    def spy(arch, data, xs, targets, *args, **kwargs):
        seen.setdefault("targets", []).append(targets)
        return original(arch, data, xs, targets, *args, **kwargs)

    monkeypatch.setattr(evaluate_lib, "train_and_test_seeds", spy)
    jobs = [
        j for j in plan.jobs if j.stage == "evaluate" and j.params["subject"] in {"distilled", "random_real"}
    ]
    for job in jobs:
        base.execute(job, cfg, store)
    learned = artifacts.load_synthetic(store, plan.keys["distill"]).label_logits
    distilled, random_real = seen["targets"]
    for target in distilled:
        assert torch.allclose(target, torch.softmax(learned, 1))
    for target in random_real:  # the experts' soft labels, not one-hot rows
        assert target.shape == (20, 10)
        assert torch.allclose(target.sum(1), torch.ones(20))
        assert (target.max(1).values < 1 - 1e-6).all()


def test_exported_sets_carry_the_learned_labels(datm_run):
    store, cfg, plan = datm_run
    run_jobs(store, cfg, plan, {"teacher", "evaluate", "soft_labels", "export"})
    exported = load_distilled(store.path("export", plan.keys["export"]))
    learned = artifacts.load_synthetic(store, plan.keys["distill"]).label_logits
    assert exported.manifest["labels"] == "learned"
    assert torch.equal(exported.label_logits, learned)
    # A plain webdataset reader sees them too, one logits.npy per sample.
    shards = sorted(str(p) for p in store.path("export", plan.keys["export"]).glob("distilled-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert torch.equal(torch.from_numpy(np.stack([s["logits.npy"] for s in samples])), learned)


def test_ftd_stores_the_moving_average_of_its_images(tmp_path):
    """With decay d, the stored images after two iterations are d(d x0 + (1-d) x1) + (1-d) x2, where
    x_i are the images an FTD run without averaging reaches (the average does not steer the run)."""
    cfg = load_config("digits-ftd", [*TINY, "distill.iterations=2", "distill.ema_decay=0.5"])
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    data = load(store, plan.keys["dataset"])
    buffer = artifacts.load_buffer(store, plan.keys["experts"])

    def images(iterations: int, decay: float | None) -> torch.Tensor:
        section = cfg.distill.model_copy(update={"iterations": iterations, "ema_decay": decay})
        inputs = DistillInputs(data, cfg.ipc, cfg.seed, section, cfg.model, cfg.dsa, experts=buffer)
        return mtt_module.match_trajectories(inputs, _NoCheckpoints(), Notes(), "FTD").images

    x0 = initial_images(data, cfg.ipc, "real", torch.Generator().manual_seed(cfg.seed), lambda s: None)
    x1, x2 = images(1, None), images(2, None)
    expected = 0.5 * (0.5 * x0 + 0.5 * x1) + 0.5 * x2
    averaged = images(2, 0.5)
    assert not torch.allclose(x2, x0)
    assert torch.allclose(averaged, expected, atol=1e-6)


class _NoCheckpoints:
    def load(self):
        return None

    def save(self, state):
        pass


def test_a_killed_datm_run_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    cfg = load_config("digits-datm", DATM_TINY)
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    key = plan.keys["distill"]
    kill_distillation_at_first_checkpoint(store, cfg, plan, monkeypatch)
    notes = Notes()
    run_jobs(store, cfg, plan, {"distill"}, notes)
    assert any("resuming DATM from checkpoint at iteration 2/6" in n for n in notes.lines)
    resumed = artifacts.load_synthetic(store, key)

    fresh = Store(tmp_path / "fresh")
    fresh_plan = plan_for(fresh, cfg)
    run_jobs(fresh, cfg, fresh_plan, {"experts", "distill"})
    uninterrupted = artifacts.load_synthetic(fresh, key)
    assert resumed.images.numpy().tobytes() == uninterrupted.images.numpy().tobytes()
    assert resumed.label_logits.numpy().tobytes() == uninterrupted.label_logits.numpy().tobytes()
    assert [h["start_epoch"] for h in resumed.history] == [h["start_epoch"] for h in uninterrupted.history]


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("digits-ftd", ["experts.optimizer=sgd"], "ftd trains on flat .*experts.optimizer=gsam"),
        ("digits-pad", ["experts.schedule=false"], "pad trains its experts on difficulty-ordered data"),
        ("digits-mtt", ["evaluate.labels=learned"], "mtt learns none"),
        ("digits-datm", ["distill.initial_max_start_epoch=30"], "must not exceed max_start_epoch"),
    ],
)
def test_successor_configs_refuse_what_their_paper_does_not_do(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        configure(load_config(preset, overrides))


def test_pad_matches_only_the_deep_parameters(tmp_path):
    cfg = load_config(
        "digits-pad",
        [
            *DATM_TINY,
            "experts.schedule.add_end_epoch=1",
            "experts.schedule.rm_epoch_first=2",
            "experts.schedule.rm_epoch_second=3",
        ],
    )
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"difficulty", "experts", "distill"})
    meta = store.meta("distill", plan.keys["distill"])
    net = FlatParams(student_model(load(store, plan.keys["dataset"]), cfg.model))
    assert meta["stats"]["matched_parameters"] == net.numel - shallow_cut(net, 0.5)
    assert 0.5 * net.numel <= meta["stats"]["matched_parameters"] < net.numel  # the conv layer is out
    assert np.isfinite(artifacts.load_synthetic(store, plan.keys["distill"]).images.numpy()).all()
