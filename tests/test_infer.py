"""INFER: one compensator shared by a batch of every class, the ensemble teacher's labels as the mean
of its members' logits, the real-image limit, a digits set beating random real images end to end
with its cost in the summary, and resume after a kill."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import condense
from condense import artifacts, labels, teacher
from condense.config import DSAConfig, ModelConfig, TeacherConfig
from condense.configure import load_config
from condense.errors import ConfigError
from condense.methods import configure, infer, recover
from condense.methods.base import DistillInputs
from condense.prepare import PreparedDataset
from condense.progress import SILENT
from condense.store import Store
from condense.synthetic import SyntheticSet
from tests.conftest import Notes, kill_distillation_at_first_checkpoint, plan_for, run_jobs, run_pipeline
from tests.test_matching import MemoryCheckpoints

MODEL = ModelConfig(width=16, norm="batchnorm")
TINY = {"iterations": 12, "checkpoint_every": 5, "jitter": 1, "lr": 0.1, "r_bn": 0.1}
PIPELINE = [
    "compute.device=cpu",
    "dataset.train_per_class=20",
    "teacher.epochs=6",
    "distill.iterations=60",
    "evaluate.seeds=2",
    "evaluate.epochs=20",
    "evaluate.full_data=false",
]
"""digits-infer (two batch-norm ConvNet teachers), small enough for seconds."""


@pytest.fixture(scope="module")
def second_teacher(digits30: PreparedDataset) -> nn.Module:
    """Another batch-norm ConvNet, of another seed and width: the ensemble's second member."""
    cfg = TeacherConfig(source="train", epochs=6, batch_size=64, dsa=False)
    return teacher.train_teacher(digits30, cfg, ModelConfig(width=24), DSAConfig(), seed=1).model


def run_infer(data, model: nn.Module, ipc: int, **settings) -> SyntheticSet:
    cfg = infer.INFERConfig(**{**TINY, **settings})
    inputs = DistillInputs(data, ipc, 0, cfg, MODEL, DSAConfig(), teacher=model)
    return infer.distill(inputs, MemoryCheckpoints(), SILENT)


def test_the_real_share_of_the_budget_follows_the_paper():
    cfg = infer.INFERConfig()
    assert infer.real_per_class(cfg, 10, 4, 100) == 9  # CIFAR-100 IPC 10: 9 real + 36 compensators
    assert infer.real_per_class(cfg, 10, 4, 10) == 7  # CIFAR-10 IPC 10: 7 real + 28 compensators
    assert infer.real_per_class(cfg, 50, 4, 100) == 48
    assert infer.real_per_class(cfg, 1, 2, 10) == 1  # the paper's rule gives 0: one at least
    assert infer.real_per_class(infer.INFERConfig(real_per_class=3), 10, 4, 10) == 3


def test_one_compensator_is_shared_by_the_whole_class_batch(digits30, bn_teacher, second_teacher):
    ensemble = artifacts.Ensemble([bn_teacher.model, second_teacher])
    result = run_infer(digits30, ensemble, ipc=2)  # K = 20 // 12 = 1 real image per class, M = 2
    compensators, picks = result.arrays["compensators"], result.arrays["real_indices"]
    assert compensators.shape == (2, 1, 8, 8) and picks.shape == (10, 1)
    assert result.stats["storage"] == {
        "stored_images": 12,
        "training_images": 30,
        "image_bytes": 10 * 64 + 2 * 64 * 4,
        "real_image_bytes": 10 * 64,
        "compensator_bytes": 2 * 64 * 4,
        "static_label_bytes": 30 * 10 * 4,
    }
    real = digits30.images(picks.flatten())
    images = result.images.reshape(10, 3, 1, 8, 8)  # per class: real, + u_1, + u_2
    assert torch.equal(images[:, 0], real)
    assert result.labels.tolist() == [c for c in range(10) for _ in range(3)]
    low, high = recover.pixel_bounds(digits30)
    for m in range(2):
        u = compensators[m]
        assert float(u.abs().max()) > 0.01  # it moved
        added = images[:, 1 + m] - real
        inside = ((real + u) > low) & ((real + u) < high)
        assert inside.float().mean() > 0.5
        # Every class's image got the same tensor, where the pixel range did not clip it.
        assert torch.allclose(added[inside], u.expand_as(added)[inside], atol=1e-6)
    assert not torch.allclose(compensators[0], compensators[1])  # one per teacher
    teachers = [h["teacher"] for h in result.history]
    assert teachers == sorted(teachers) and set(teachers) == {0, 1}


def test_the_ensemble_label_is_the_mean_of_the_teachers_logits(digits30, bn_teacher, second_teacher):
    first, second = bn_teacher.model.eval(), second_teacher.eval()
    ensemble = artifacts.Ensemble([first, second]).eval()
    x = digits30.images(torch.arange(20))
    with torch.no_grad():
        a, b = first(x), second(x)
        assert not torch.allclose(a, b)
        assert torch.allclose(ensemble(x), (a + b) / 2, atol=1e-6)
    soft = labels.soft_labels(ensemble, x, 4.0)
    assert torch.allclose(soft, torch.softmax((a + b) / 2 / 4.0, dim=1), atol=1e-6)
    assert artifacts.teacher_members(ensemble) == [first, second]
    assert artifacts.teacher_members(first) == [first]


def test_one_teacher_and_no_steps_leave_the_real_images(digits30, bn_teacher):
    result = run_infer(digits30, bn_teacher.model, ipc=1, iterations=0)
    assert result.stats["teachers"] == 1 and result.stats["real_per_class"] == 1
    picks = result.arrays["real_indices"].flatten()
    assert digits30.train_y[picks].tolist() == list(range(10))
    real = digits30.images(picks)
    assert torch.equal(result.images[0::2], real) and torch.equal(result.images[1::2], real)
    assert not result.arrays["compensators"].any()


def test_an_instance_norm_ensemble_member_is_refused():
    # A timm ResNet first teacher has batch norm whatever teacher.norm says; the ConvNet member has not.
    assert load_config("digits-infer", ["teacher.arch=resnet18"]).teacher.ensemble == ["convnet"]
    with pytest.raises(ConfigError, match="batch-norm teacher"):
        load_config("digits-infer", ["teacher.arch=resnet18", "teacher.norm=instancenorm"])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("infer-store")
    cfg = configure(load_config("digits-infer", PIPELINE))
    return store, run_pipeline(Store(store), cfg)


def test_infer_beats_random_real_images_and_reports_what_it_stores(digits_run):
    store, summary = digits_run
    distilled, random = summary["accuracy"]["convnet"]["mean"], summary["baselines"]["random_real"]["mean"]
    assert distilled > random + 2  # 66.4 vs 62.2 here, both under the KD recipe with the ensemble
    assert summary["storage"]["stored_images"] == 12 and summary["storage"]["training_images"] == 30
    assert [m["arch"] for m in summary["teacher"]["members"]] == ["convnet", "convnet"]
    assert len(condense.load_distilled(summary["artifacts"]["run_dir"])) == 30
    # The static labels (the soft-labels stage) are the softmax of the members' mean logits.
    keys = summary["keys"]
    ensemble = artifacts.load_teacher(Store(store), keys["teacher"])
    assert isinstance(ensemble, artifacts.Ensemble) and len(ensemble.members) == 2
    images = artifacts.load_synthetic(Store(store), keys["distill"]).images
    with torch.no_grad():
        mean = torch.stack([member(images) for member in ensemble.members]).mean(0)
    soft = artifacts.load_soft_labels(Store(store), keys["soft_labels"])
    assert torch.allclose(soft, torch.softmax(mean / 4.0, dim=1), atol=1e-5)


def test_a_killed_infer_run_resumes_and_matches_byte_for_byte(digits_run, tmp_path, monkeypatch):
    store, _ = digits_run
    cfg = configure(
        load_config("digits-infer", [*PIPELINE, "distill.iterations=6", "distill.checkpoint_every=2"])
    )
    killed, fresh = Store(tmp_path / "killed"), Store(tmp_path / "fresh")
    for copy in (killed, fresh):  # the dataset and the teachers, already there
        shutil.copytree(store, copy.root, dirs_exist_ok=True)
    plan = plan_for(killed, cfg)
    kill_distillation_at_first_checkpoint(killed, cfg, plan, monkeypatch)
    notes = Notes()
    outcome = run_jobs(killed, cfg, plan, {"teacher", "distill"}, notes)
    assert [o["stage"] for o in outcome] == [
        "teacher",
        "teacher",
        "distill",
    ]  # the member's part, then the seal
    assert outcome[0]["cached"] and outcome[1]["cached"] and not outcome[2]["cached"]
    assert any("from checkpoint at iteration 2/6" in n for n in notes.lines)
    run_jobs(fresh, cfg, plan_for(fresh, cfg), {"teacher", "distill"})
    resumed = artifacts.load_synthetic_arrays(killed, plan.keys["distill"])
    uninterrupted = artifacts.load_synthetic_arrays(fresh, plan.keys["distill"])
    assert set(resumed) == {"images", "labels", "pixels", "real_indices", "compensators"}
    for name, array in resumed.items():
        assert np.asarray(array).tobytes() == np.asarray(uninterrupted[name]).tobytes(), name
