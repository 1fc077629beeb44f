"""The teacher, stored (FKD) and online relabeling, and the KD evaluation recipe on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from condense import relabel, teacher
from condense.config import KDRecipeConfig, ModelConfig, TeacherConfig
from condense.errors import ConfigError, DatasetError
from condense.evaluate import KDRecipe, train_and_test_kd
from condense.prepare import PreparedDataset
from condense.training import cosine_factor

MODEL = ModelConfig(width=16)


@pytest.fixture
def digits(digits30: PreparedDataset) -> PreparedDataset:
    return digits30


@pytest.fixture
def trained(bn_teacher: teacher.TrainedTeacher) -> teacher.TrainedTeacher:
    return bn_teacher


def test_a_trained_batchnorm_teacher_knows_the_classes(digits, trained):
    assert trained.test_accuracy > 60 and trained.train_accuracy > 60
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.model.modules())
    g = torch.Generator().manual_seed(0)
    assert teacher.check_class_order(trained.model, digits, None, 10, g) > 60


def test_a_teacher_with_another_class_order_is_refused(digits, trained, tmp_path: Path):
    shuffled = teacher.build_teacher(TeacherConfig(source="train"), MODEL, digits)
    state = {k: v.clone() for k, v in trained.model.state_dict().items()}
    perm = torch.roll(torch.arange(10), 3)  # class c's row now answers for class c + 3
    state["classifier.weight"], state["classifier.bias"] = (
        state["classifier.weight"][perm],
        state["classifier.bias"][perm],
    )
    torch.save(state, tmp_path / "observer.pt")
    loaded = teacher.load_teacher_file(tmp_path / "observer.pt", shuffled)
    with pytest.raises(DatasetError, match="class order does not match"):
        teacher.check_class_order(loaded, digits, None, 10, torch.Generator().manual_seed(0))


def test_a_teacher_file_of_another_architecture_is_a_config_error(digits, tmp_path: Path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "wrong.pt")
    model = teacher.build_teacher(TeacherConfig(source="train"), MODEL, digits)
    with pytest.raises(ConfigError, match="does not fit the teacher architecture"):
        teacher.load_teacher_file(tmp_path / "wrong.pt", model)
    with pytest.raises(ConfigError, match="not found"):
        teacher.load_teacher_file(tmp_path / "missing.pt", model)


def test_top_k_keeps_the_largest_probabilities_and_spreads_the_rest():
    probs = torch.softmax(torch.randn(6, 10), dim=1)
    indices, values = relabel.top_k(probs, 3)
    full = relabel.expand_top_k(indices, values, 10)
    torch.testing.assert_close(full.sum(1), torch.ones(6))
    torch.testing.assert_close(full.gather(1, indices), values)
    assert torch.equal(full.argmax(1), probs.argmax(1))
    rest = full.scatter(1, indices, -1.0)
    assert torch.allclose(rest[rest >= 0].view(6, 7), rest[rest >= 0].view(6, 7)[:, :1].expand(6, 7))
    everything = relabel.expand_top_k(*relabel.top_k(probs, None), 10)
    torch.testing.assert_close(everything, probs)


def test_plans_cover_every_image_once_and_build_batches_of_the_right_shape(digits):
    aug = relabel.KDAugment.from_config(KDRecipeConfig(crop_scale=(0.5, 1.0)), factor=2)
    plan = relabel.sample_plan(23, 10, aug, torch.Generator().manual_seed(0))
    assert sorted(plan.order.tolist()) == list(range(23))
    assert plan.mix_boxes.shape == (3, 4) and plan.patch_perm.shape == (23, 4)
    assert sorted(plan.mix_partner[20:].tolist()) == [0, 1, 2]  # the last batch is 3 images
    batch = relabel.plan_inputs(digits.train_x[:23], plan, 2, 10, factor=2)
    assert batch.shape == (3, 1, 8, 8)


def test_stored_labels_replay_exactly_what_the_online_teacher_gives(digits, trained):
    images = digits.train_x[:20]
    aug = relabel.KDAugment.from_config(KDRecipeConfig(flip=True))
    arrays = relabel.relabel(trained.model, images, aug, 3, 8, 4.0, k=4, fp16=True, seed=11)
    assert arrays["top_k_prob"].shape == (3, 20, 4) and arrays["top_k_prob"].dtype == np.float16
    assert arrays["boxes"].shape == (3, 20, 4) and arrays["mix_boxes"].shape == (3, 3, 4)
    stored = relabel.StoredLabels(arrays, 10, 8)
    plans = relabel.online_plans(20, 8, aug, seed=11, fp16=True)
    online = relabel.online_labels(trained.model, 4.0, 4, fp16=True)
    for epoch in range(3):
        plan = stored.plan(epoch)
        assert torch.equal(plan.boxes, plans(epoch).boxes)
        inputs = relabel.plan_inputs(images, plan, 1, 8, 1)
        torch.testing.assert_close(stored.targets(epoch, 1, inputs), online(epoch, 1, inputs))


def _kd(epochs: int = 30) -> KDRecipe:
    aug = relabel.KDAugment.from_config(KDRecipeConfig(flip=False))
    return KDRecipe(epochs, 1e-3, 0.01, 0.0, 20, 4.0, aug)


def test_kd_training_on_ten_images_learns_from_the_teacher(digits, trained):
    x = digits.train_x[torch.arange(10) * 30]  # one image per class (class-major data)
    recipe = _kd()
    plans = relabel.online_plans(10, 20, recipe.augment, seed=0, fp16=True)
    targets = relabel.online_labels(trained.model, 4.0, None, fp16=True)
    result = train_and_test_kd("convnet", digits, x, recipe, 0, plans, targets, MODEL)
    assert result["accuracy"] > 30  # chance is 10 %


def test_training_on_stored_labels_equals_training_with_the_online_teacher(digits, trained):
    x = digits.train_x[:20]
    recipe = _kd(epochs=4)
    arrays = relabel.relabel(trained.model, x, recipe.augment, 4, 20, 4.0, 3, True, seed=5)
    stored = relabel.StoredLabels(arrays, 10, 20)
    replayed = train_and_test_kd("convnet", digits, x, recipe, 1, stored.plan, stored.targets, MODEL)
    plans = relabel.online_plans(20, 20, recipe.augment, seed=5, fp16=True)
    targets = relabel.online_labels(trained.model, 4.0, 3, fp16=True)
    online = train_and_test_kd("convnet", digits, x, recipe, 1, plans, targets, MODEL)
    assert replayed["accuracy"] == online["accuracy"] and replayed["train_loss"] == online["train_loss"]


def test_cosine_schedule_ends_at_the_requested_fraction():
    assert cosine_factor(0, 10, 0.0) == 1.0
    assert abs(cosine_factor(10, 10, 0.0)) < 1e-12 and abs(cosine_factor(10, 10, 0.5) - 0.5) < 1e-12
