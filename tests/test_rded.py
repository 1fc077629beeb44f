"""RDED: the teacher's most confident real crops, stitched; resumable per class; guarded class order."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from condense import teacher
from condense.config import DSAConfig, ModelConfig, TeacherConfig
from condense.configure import load_config
from condense.errors import ConfigError, DatasetError
from condense.methods import rded
from condense.methods.base import DistillInputs
from condense.prepare import PreparedDataset
from condense.progress import SILENT
from condense.stages.base import TorchCheckpoints
from tests.conftest import KillAfter, Notes
from tests.test_matching import MemoryCheckpoints

MODEL = ModelConfig(width=16)


@pytest.fixture
def digits(digits30: PreparedDataset) -> PreparedDataset:
    return digits30


@pytest.fixture
def observer(bn_teacher: teacher.TrainedTeacher) -> torch.nn.Module:
    return bn_teacher.model


def make_inputs(
    data: PreparedDataset, model: torch.nn.Module | None, ipc: int = 2, **cfg: Any
) -> DistillInputs:
    return DistillInputs(
        data=data,
        ipc=ipc,
        seed=0,
        method_cfg=rded.RDEDConfig(**({"candidates": 20} | cfg)),
        model_cfg=MODEL,
        dsa_cfg=DSAConfig(),
        teacher=model,
    )


def test_rded_keeps_the_crops_the_teacher_is_most_sure_of(digits, observer):
    result = rded.distill(make_inputs(digits, observer), MemoryCheckpoints(), SILENT)
    assert result.images.shape == (20, 1, 8, 8)
    assert result.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert result.stats["selected_ce"] < result.stats["candidate_ce"]
    assert all(h["selected_ce"] <= h["candidate_ce"] for h in result.history)
    predicted = observer(result.images).argmax(1)
    assert float((predicted == result.labels).float().mean()) >= 0.9


def test_select_class_scores_every_crop_and_keeps_the_lowest_cross_entropy(digits, observer):
    images = digits.train_x[digits.train_y == 3][:12]
    cfg = rded.RDEDConfig(candidates=12, crops_per_image=4)
    g = torch.Generator().manual_seed(1)
    chosen, stats = rded.select_class(observer, images, 3, ipc=2, cfg=cfg, generator=g)
    assert chosen.shape == (2, 1, 8, 8)
    ce = rded.score_crops(observer, chosen, 3, 8)
    assert float(ce.mean()) == pytest.approx(stats["selected_ce"], abs=1e-4)


def test_factor_two_stitches_four_half_size_patches_per_image(digits, observer):
    result = rded.distill(make_inputs(digits, observer, ipc=1, factor=2), MemoryCheckpoints(), SILENT)
    assert result.images.shape == (10, 1, 8, 8) and result.stats["factor"] == 2


def test_a_killed_run_resumes_at_the_next_class_and_matches(digits, observer, tmp_path):
    checkpoints = TorchCheckpoints(tmp_path / "checkpoint.pt")
    with pytest.raises(KeyboardInterrupt):
        rded.distill(make_inputs(digits, observer), KillAfter(checkpoints, saves=4), SILENT)
    recorder = Notes()
    resumed = rded.distill(make_inputs(digits, observer), checkpoints, recorder)
    assert any("resuming RDED after class 3" in note for note in recorder.lines)
    uninterrupted = rded.distill(make_inputs(digits, observer), MemoryCheckpoints(), SILENT)
    assert torch.equal(resumed.images, uninterrupted.images)


def test_a_teacher_that_does_not_know_the_classes_is_refused(digits):
    untrained = teacher.build_teacher(TeacherConfig(source="train"), MODEL, digits)
    with pytest.raises(DatasetError, match="class order"):
        rded.distill(make_inputs(digits, untrained, min_teacher_accuracy=90), MemoryCheckpoints(), SILENT)
    with pytest.raises(ConfigError, match="needs a teacher"):
        rded.distill(make_inputs(digits, None), MemoryCheckpoints(), SILENT)
    with pytest.raises(ConfigError, match="must divide"):
        rded.distill(make_inputs(digits, untrained, factor=3), MemoryCheckpoints(), SILENT)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ipc=5", "distill.candidates=4"], "needs distill.candidates >= 5"),
        (["distill.crop_scale=[0.5, 0.2]"], "crop_scale"),
        (["relabel.mode=stored", "evaluate.recipe=mtt"], "set evaluate.recipe=kd"),
        (["evaluate.labels=soft"], "applies to the mtt recipe"),
        (["teacher.source=file"], "needs teacher.path"),
    ],
)
def test_bad_rded_settings_are_config_errors(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config("digits-rded", overrides)
