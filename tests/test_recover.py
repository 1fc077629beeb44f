"""SRe2L's recover loop, CDA's crop-scale curriculum and CUDD's curricula on digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condense import teacher
from condense.config import DSAConfig, ModelConfig
from condense.configure import load_config
from condense.errors import ConfigError
from condense.methods import cda, cudd, recover, sre2l
from condense.methods.base import DistillInputs
from condense.models import build_model
from condense.prepare import PreparedDataset
from condense.progress import SILENT
from condense.stages.base import TorchCheckpoints
from condense.training import accuracy
from tests.conftest import KillAfter, Notes
from tests.test_matching import MemoryCheckpoints

MODEL = ModelConfig(width=16, norm="batchnorm")
TINY = {"iterations": 12, "checkpoint_every": 5, "jitter": 1, "crop_min_scale": 0.5, "r_bn": 0.1}


@pytest.fixture
def digits(digits30: PreparedDataset) -> PreparedDataset:
    return digits30


@pytest.fixture
def observer(bn_teacher: teacher.TrainedTeacher) -> nn.Module:
    return bn_teacher.model


def make_inputs(data, model, cfg, ipc: int = 2) -> DistillInputs:
    return DistillInputs(
        data=data, ipc=ipc, seed=0, method_cfg=cfg, model_cfg=MODEL, dsa_cfg=DSAConfig(), teacher=model
    )


@pytest.mark.parametrize(
    ("curriculum", "expected"),
    [
        ("none", [0.08, 0.08, 0.08, 0.08]),
        ("step", [1.0, 1.0, 0.08, 0.08]),
        ("linear", [1.0, 0.54, 0.08, 0.08]),
        ("cosine", [1.0, 0.54, 0.08, 0.08]),
    ],
)
def test_cda_crop_scale_moves_from_global_to_local(curriculum: str, expected: list[float]):
    cfg = recover.RecoverConfig(crop_curriculum=curriculum, milestone=0.5)
    got = [recover.crop_min_scale(it, 100, cfg) for it in (0, 25, 50, 99)]
    assert got == pytest.approx(expected)
    cosine = recover.RecoverConfig(crop_curriculum="cosine")
    assert recover.crop_min_scale(10, 100, cosine) > 0.9 > recover.crop_min_scale(90, 100, cosine)


def test_bn_statistics_loss_is_zero_when_the_batch_matches_the_running_statistics():
    net = nn.Sequential(
        nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    )
    x = torch.randn(64, 1, 4, 4)
    net.train()
    net[1].momentum, net[4].momentum = 1.0, 1.0  # running statistics := this batch's (unbiased var)
    net(x)
    net.eval()
    stats = recover.BNStatistics(net, first_multiplier=10.0)
    with stats.hooked():
        net(x)
    assert float(stats.loss().detach()) < 0.05  # only the unbiased/biased variance gap remains
    with stats.hooked():
        net(x * 3 + 1)
    assert float(stats.loss().detach()) > 1.0
    with pytest.raises(ConfigError, match="no batch-norm layers"):
        recover.BNStatistics(nn.Linear(2, 2), 1.0)


def test_recovery_from_noise_lowers_the_teacher_loss_and_respects_pixel_bounds(digits, observer):
    cfg = recover.RecoverConfig(**{**TINY, "iterations": 40})
    result = sre2l.distill(make_inputs(digits, observer, cfg), MemoryCheckpoints(), SILENT)
    assert result.images.shape == (20, 1, 8, 8)
    assert result.labels.tolist() == [c for c in range(10) for _ in range(2)]
    low, high = recover.pixel_bounds(digits)
    assert bool((result.images >= low - 1e-6).all() and (result.images <= high + 1e-6).all())
    first, last = result.history[0], [h for h in result.history if h["batch"] == 0][-1]
    assert last["ce"] < first["ce"]
    assert result.stats["teacher_synthetic_accuracy"] >= 80
    assert result.stats["final_bn_loss"] > 0
    assert {"it", "ce", "bn", "crop_min_scale", "loss"} <= set(first)


def test_cda_logs_its_shrinking_crop_scale(digits, observer):
    cfg = cda.CDAConfig(**TINY)
    result = sre2l.distill(make_inputs(digits, observer, cfg, ipc=1), MemoryCheckpoints(), SILENT)
    scales = [h["crop_min_scale"] for h in result.history]
    assert scales[0] == 1.0 and scales[-1] < 0.6 and scales == sorted(scales, reverse=True)


def test_a_killed_recovery_resumes_mid_batch_and_matches(digits, observer, tmp_path):
    cfg = recover.RecoverConfig(**TINY)
    checkpoints = TorchCheckpoints(tmp_path / "checkpoint.pt")
    with pytest.raises(KeyboardInterrupt):  # saves: batch 1 at step 5, 10, its end, batch 2 at step 5
        sre2l.distill(make_inputs(digits, observer, cfg), KillAfter(checkpoints, saves=4), SILENT)
    assert len(checkpoints.load()["batches"]) == 1 and checkpoints.load()["partial"]["iteration"] == 5
    recorder = Notes()
    resumed = sre2l.distill(make_inputs(digits, observer, cfg), checkpoints, recorder)
    assert any("resuming recovery with 1 of 2 batches done" in note for note in recorder.lines)
    uninterrupted = sre2l.distill(make_inputs(digits, observer, cfg), MemoryCheckpoints(), SILENT)
    assert torch.equal(resumed.images, uninterrupted.images)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in uninterrupted.history]


def test_select_initial_prefers_what_the_student_gets_wrong_and_never_reuses(digits):
    n = len(digits.train_y)
    teacher_right = torch.ones(n, dtype=torch.bool)
    student_right = torch.ones(n, dtype=torch.bool)
    wrong = torch.nonzero(digits.train_y == 0).flatten()[:3]
    student_right[wrong] = False
    used = torch.nonzero(digits.train_y == 1).flatten()[:28]
    picks, counts = cudd.select_initial(
        digits, teacher_right, student_right, 2, used, torch.Generator().manual_seed(0)
    )
    assert picks.shape == (10, 2)
    assert set(picks[0].tolist()) <= set(wrong.tolist())
    assert not set(picks.flatten().tolist()) & set(used.tolist())
    assert counts["medium"] == 2 and counts["simple"] == 18
    first, counts = cudd.select_initial(digits, teacher_right, None, 2, used[:0], torch.Generator())
    assert counts == {"simple": 20, "medium": 0, "hard": 0, "other": 0}


CUDD_TINY = {**TINY, "curricula": [1, 1], "student_epochs": 3, "student_batch_size": 10}


def test_cudd_trains_a_student_between_curricula_and_adds_its_terms(digits, observer):
    cfg = cudd.CUDDConfig(**CUDD_TINY)
    checkpoints = MemoryCheckpoints()
    result = cudd.distill(make_inputs(digits, observer, cfg), checkpoints, SILENT)
    first, second = result.stats["curricula"]
    assert "student_accuracy" not in first
    # The recorded accuracy is the checkpointed student's, on the real test split.
    student = build_model("convnet", 1, 10, 8, MODEL)
    student.load_state_dict(checkpoints.state["curricula"][1]["student"])
    assert second["student_accuracy"] == round(accuracy(student.eval(), digits.test_x, digits.test_y), 2)
    assert first["init"]["simple"] == 10 and sum(second["init"].values()) == 10
    first_batch = [h for h in result.history if h["batch"] == 0]
    second_batch = [h for h in result.history if h["batch"] == 1]
    assert "l2" in first_batch[-1] and "adv" not in first_batch[-1]
    assert "adv" in second_batch[-1] and "l2" in second_batch[-1]
    assert first_batch[0]["l2"] == 0.0  # it starts at its real anchor


def test_a_killed_cudd_run_resumes_in_its_curriculum(digits, observer, tmp_path):
    cfg = cudd.CUDDConfig(**CUDD_TINY)
    checkpoints = TorchCheckpoints(tmp_path / "checkpoint.pt")
    # saves: curriculum 1 start, step 5, 10, batch end, curriculum 2 start (after its student), step 5
    with pytest.raises(KeyboardInterrupt):
        cudd.distill(make_inputs(digits, observer, cfg), KillAfter(checkpoints, saves=6), SILENT)
    assert checkpoints.load()["curriculum"] == 1
    recorder = Notes()
    resumed = cudd.distill(make_inputs(digits, observer, cfg), checkpoints, recorder)
    assert any("resuming CUDD in curriculum 2/2" in note for note in recorder.lines)
    uninterrupted = cudd.distill(make_inputs(digits, observer, cfg), MemoryCheckpoints(), SILENT)
    assert torch.equal(resumed.images, uninterrupted.images)
    assert resumed.stats["curricula"] == uninterrupted.stats["curricula"]


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("digits-sre2l", ["teacher.norm=instancenorm"], "use a batch-norm teacher"),
        ("digits-cda", ["teacher.source=best_expert", "model.norm=instancenorm"], "batch-norm teacher"),
        ("digits-sre2l", ["dataset.zca=true"], "dataset.zca must be false"),
        ("digits-cudd", ["distill.curricula=[1, 2]"], "must be positive and sum to ipc=2"),
        ("digits-cudd", ["distill.init=noise"], "init must be 'real'"),
    ],
)
def test_bad_recover_settings_are_config_errors(preset: str, overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, overrides)
