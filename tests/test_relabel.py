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


def _nbytes(arrays: dict[str, np.ndarray], prefix: str = "") -> int:
    return sum(a.nbytes for name, a in arrays.items() if name.startswith(prefix))


def test_stored_epochs_keeps_the_first_epochs_and_replays_them_cyclically(digits, trained):
    images = digits.train_x[:20]
    aug = relabel.KDAugment.from_config(KDRecipeConfig(flip=True))
    full = relabel.relabel(trained.model, images, aug, 6, 8, 4.0, 4, True, seed=3)
    cut = relabel.relabel(trained.model, images, aug, 6, 8, 4.0, 4, True, seed=3, stored_epochs=2)
    assert cut["order"].shape[0] == 2 and full["order"].shape[0] == 6
    for name, array in cut.items():  # the same seeded stream: the first two epochs of the full run
        assert np.array_equal(array, full[name][:2]), name
    assert _nbytes(full) == 3 * _nbytes(cut)
    stored = relabel.StoredLabels(cut, 10, 8)
    cycled = relabel.online_plans(20, 8, aug, seed=3, fp16=True, cycle=2)
    fresh = relabel.online_plans(20, 8, aug, seed=3, fp16=True)
    for epoch in range(6):
        plan, first = stored.plan(epoch), stored.plan(epoch % 2)
        assert torch.equal(plan.order, first.order) and torch.equal(plan.boxes, first.boxes)
        assert torch.equal(cycled(epoch).boxes, plan.boxes)
        inputs = relabel.plan_inputs(images, plan, 1, 8, 1)
        assert torch.equal(stored.targets(epoch, 1, inputs), stored.targets(epoch % 2, 1, inputs))
        if epoch >= 2:  # without the cycle, later epochs draw new crops
            assert not torch.equal(fresh(epoch).boxes, plan.boxes)
        else:
            assert torch.equal(fresh(epoch).boxes, plan.boxes)


def test_uint8_codes_are_within_half_a_step_of_the_row_maximum():
    probs = torch.softmax(torch.randn(200, 10) * 3, dim=1)
    for fp16, slack in ((False, 1e-6), (True, 2.0**-11)):
        columns = relabel.encode(probs, fp16, "uint8")
        assert columns["code"].dtype == torch.uint8 and columns["scale"].shape == (200,)
        restored = relabel.decode(columns)
        row_max = probs.amax(1, keepdim=True)
        error = (restored - probs).abs()
        assert torch.all(error <= row_max * (1 / 510 + slack))
        assert error.max() > row_max.min() / 2000  # it is a real rounding, not a pass-through
        assert torch.equal(restored.argmax(1), probs.argmax(1))
    # Per-row scaling: a flat row (a KD temperature) keeps its values; a fixed [0, 1] grid would not.
    flat = torch.softmax(torch.randn(4, 1000) * 0.1, dim=1)
    restored = relabel.decode(relabel.encode(flat, True, "uint8"))
    assert (restored - flat).abs().max() < flat.max() / 400 and restored.min() > 0
    assert (torch.round(flat * 255) / 255 - flat).abs().max() > flat.max() / 10


def test_uint8_stored_labels_are_smaller_and_replay_the_quantised_online_teacher(digits, trained):
    images = digits.train_x[:20]
    aug = relabel.KDAugment.from_config(KDRecipeConfig(flip=True))
    for k in (4, None):
        half = relabel.relabel(trained.model, images, aug, 3, 8, 4.0, k, fp16=True, seed=11)
        byte = relabel.relabel(trained.model, images, aug, 3, 8, 4.0, k, True, seed=11, quantize="uint8")
        kept = k or 10
        assert "top_k_prob" not in byte and byte["top_k_code"].shape == (3, 20, kept)
        assert byte["top_k_code"].dtype == np.uint8 and byte["top_k_scale"].shape == (3, 20)
        # float16 values (2 bytes) become 1-byte codes plus one float16 scale per row
        assert _nbytes(half, "top_k_prob") == 2 * 3 * 20 * kept
        assert _nbytes(byte, "top_k_code") + _nbytes(byte, "top_k_scale") == 3 * 20 * (kept + 2)
        assert _nbytes(byte) < _nbytes(half)
        assert ("top_k_index" in byte) == (k is not None)  # all classes: class order, no indices
        stored = relabel.StoredLabels(byte, 10, 8)
        exact = relabel.StoredLabels(half, 10, 8)
        online = relabel.online_labels(trained.model, 4.0, k, fp16=True, quantize="uint8")
        for epoch in range(3):
            inputs = relabel.plan_inputs(images, stored.plan(epoch), 2, 8, 1)
            replayed = stored.targets(epoch, 2, inputs)
            assert torch.equal(replayed, online(epoch, 2, inputs))
            reference = exact.targets(epoch, 2, inputs)
            assert 0 < (replayed - reference).abs().max() <= reference.max() / 255
            # full rows are renormalised; top-k rows get the rest of the mass spread out
            torch.testing.assert_close(replayed.sum(1), torch.ones(len(replayed)), atol=1e-6, rtol=0)


def test_all_classes_are_stored_in_class_order_without_indices(digits, trained):
    images = digits.train_x[:20]
    aug = relabel.KDAugment.from_config(KDRecipeConfig(flip=False))
    full = relabel.relabel(trained.model, images, aug, 2, 8, 4.0, None, fp16=False, seed=2)
    assert "top_k_index" not in full and full["top_k_prob"].dtype == np.float32
    stored = relabel.StoredLabels(full, 10, 8)
    plan = stored.plan(1)
    inputs = relabel.plan_inputs(images, plan, 0, 8, 1)
    expected = relabel.teacher_probs(trained.model, inputs, 4.0)
    torch.testing.assert_close(stored.targets(1, 0, inputs), expected)
    online = relabel.online_labels(trained.model, 4.0, None, fp16=False)
    assert torch.equal(stored.targets(1, 0, inputs), online(1, 0, inputs))


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


def test_training_on_uint8_cycled_stored_labels_equals_the_same_online_recipe(digits, trained):
    x = digits.train_x[:20]
    recipe = _kd(epochs=5)
    arrays = relabel.relabel(
        trained.model, x, recipe.augment, 5, 20, 4.0, 3, True, seed=5, quantize="uint8", stored_epochs=2
    )
    assert arrays["order"].shape[0] == 2
    stored = relabel.StoredLabels(arrays, 10, 20)
    replayed = train_and_test_kd("convnet", digits, x, recipe, 1, stored.plan, stored.targets, MODEL)
    plans = relabel.online_plans(20, 20, recipe.augment, seed=5, fp16=True, cycle=2)
    targets = relabel.online_labels(trained.model, 4.0, 3, fp16=True, quantize="uint8")
    online = train_and_test_kd("convnet", digits, x, recipe, 1, plans, targets, MODEL)
    assert replayed["accuracy"] == online["accuracy"] and replayed["train_loss"] == online["train_loss"]
    unquantised = relabel.online_labels(trained.model, 4.0, 3, fp16=True)
    other = train_and_test_kd("convnet", digits, x, recipe, 1, plans, unquantised, MODEL)
    assert other["train_loss"] != online["train_loss"]  # the quantisation reached the loss


def test_new_relabel_fields_change_the_relabel_and_evaluate_keys():
    from condense.configure import load_config
    from condense.stages import evaluate as evaluate_stage
    from condense.stages import relabel as relabel_stage

    base = ["evaluate.recipe=kd", "relabel.mode=stored"]
    configs = [
        load_config("digits-rded", base),
        load_config("digits-rded", [*base, "relabel.quantize=uint8"]),
        load_config("digits-rded", [*base, "relabel.stored_epochs=10"]),
    ]
    params = {"subject": "random_real", "arch": "convnet", "indices": [0]}
    for stage in (relabel_stage.config, evaluate_stage.config):
        keys = [repr(stage(cfg, params)) for cfg in configs]
        assert len(set(keys)) == 3
    with pytest.raises(ConfigError, match="quantize"):
        load_config("digits-rded", ["relabel.quantize=int4"])
    with pytest.raises(ConfigError, match="stored_epochs"):
        load_config("digits-rded", ["relabel.stored_epochs=0"])


def test_cosine_schedule_ends_at_the_requested_fraction():
    assert cosine_factor(0, 10, 0.0) == 1.0
    assert abs(cosine_factor(10, 10, 0.0)) < 1e-12 and abs(cosine_factor(10, 10, 0.5) - 0.5) < 1e-12
