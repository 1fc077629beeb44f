import pytest
import torch

from condense import scores
from condense.config import DatasetConfig, DSAConfig
from condense.evaluate import Recipe, random_real_subset, train_and_test
from condense.labels import kd_loss, soft_labels
from condense.models import ConvNet, build_model
from condense.prepare import load
from condense.scores import summarize
from condense.stages.dataset import prepare
from condense.store import Store


def _digits(tmp_path):
    store = Store(tmp_path)
    key, _ = prepare(DatasetConfig(train_per_class=20), store, ipc=1)
    return load(store, key)


def test_random_real_subset_has_ipc_per_class_and_depends_on_seed(tmp_path):
    data = _digits(tmp_path)
    x, y = random_real_subset(data, 3, seed=0)
    assert x.shape == (30, 1, 8, 8)
    assert torch.equal(torch.bincount(y), torch.full((10,), 3))
    x2, _ = random_real_subset(data, 3, seed=1)
    assert not torch.equal(x, x2)
    assert torch.equal(random_real_subset(data, 3, seed=0)[0], x)


def test_training_on_real_data_beats_chance_and_is_deterministic(tmp_path):
    data = _digits(tmp_path)
    recipe = Recipe(epochs=15, lr=0.01, batch_size=64, momentum=0.9, weight_decay=5e-4, dsa=DSAConfig())
    first = train_and_test("convnet", data, data.train_x, data.train_y, recipe, seed=3)
    second = train_and_test("convnet", data, data.train_x, data.train_y, recipe, seed=3)
    assert first["accuracy"] > 50  # 10 classes: chance is 10%
    assert first["accuracy"] == second["accuracy"]


def test_soft_label_training_with_kd_loss_and_a_timm_student(tmp_path):
    data = _digits(tmp_path)
    teacher = ConvNet(1, 10, 8)
    probs = soft_labels(teacher, data.train_x[:40], temperature=4.0)
    torch.testing.assert_close(probs.sum(1), torch.ones(40))
    recipe = Recipe(
        epochs=3, lr=0.01, batch_size=20, momentum=0.9, weight_decay=5e-4, dsa=None, temperature=4.0
    )
    student = build_model("resnet18", 1, 10, 8, seed=0)  # what train_and_test starts from
    with torch.no_grad():
        initial = float(kd_loss(student(data.train_x[:40]), probs, 4.0))
    result = train_and_test("resnet18", data, data.train_x[:40], probs, recipe, seed=0)
    assert result["train_loss"] < 0.7 * initial  # the student learns the teacher's distribution


def test_kd_loss_is_zero_for_matching_distributions():
    logits = torch.randn(5, 10)
    target = torch.softmax(logits / 2.0, dim=1)
    assert float(kd_loss(logits, target, 2.0)) < 1e-6
    assert float(kd_loss(-logits, target, 2.0)) > 0.1


def test_summary_statistics():
    assert summarize([90.0, 92.0]) == {"mean": 91.0, "std": 1.0, "runs": [90.0, 92.0]}
    assert summarize([50.0])["std"] == 0.0


def test_evaluate_model_trains_its_own_student_and_leaves_the_method_alone(tmp_path, monkeypatch):
    from condense import evaluate
    from condense.configure import load_config
    from tests.conftest import TINY, plan_for, run_jobs

    default = load_config("digits-mtt", TINY)
    pinned = load_config("digits-mtt", [*TINY, "evaluate.model.norm=batchnorm", "evaluate.random_real=false"])
    store = Store(tmp_path)
    plan, pinned_plan = plan_for(store, default), plan_for(store, pinned)
    # Experts and the distilled set are the method's: the same artifacts; only the evaluations differ.
    for stage in ("experts", "distill"):
        assert pinned_plan.keys[stage] == plan.keys[stage]
    assert not set(map(str, pinned_plan.keys["evaluate"])) & set(map(str, plan.keys["evaluate"]))

    norms = []

    def recording(arch, channels, num_classes, resolution, cfg=None, seed=0):
        norms.append(cfg.norm)
        return build_model(arch, channels, num_classes, resolution, cfg, seed)

    monkeypatch.setattr(evaluate, "build_model", recording)
    run_jobs(store, pinned, pinned_plan, {"experts", "distill", "evaluate"})
    assert norms and set(norms) == {"batchnorm"}
    net = build_model("convnet", 1, 10, 8, pinned.student)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert default.student.norm == pinned.model.norm == "instancenorm"


def test_masked_temperature_scaling_never_reads_the_test_split(tmp_path, monkeypatch):
    """Every input the student sees while its temperatures are fitted is a held-out training image
    (masked or not), never a test image: a test image seen there fails the run."""
    from condense import evaluate

    data = _digits(tmp_path)
    test_images = {tuple(row.flatten().tolist()) for row in data.test_x}
    fitting = {"on": False}
    fit = evaluate.masked_temperature

    def watched(*args, **kwargs):
        fitting["on"] = True
        try:
            return fit(*args, **kwargs)
        finally:
            fitting["on"] = False

    class Watched(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if fitting["on"]:
                assert not test_images & {tuple(row.flatten().tolist()) for row in x}, "test split read"
            return self.inner(x)

    monkeypatch.setattr(evaluate, "masked_temperature", watched)
    model = Watched(ConvNet(1, 10, 8))
    held_out = evaluate.held_out_split(data, 0, mask_ratios=(0.0, 0.5))
    seen = evaluate.tested(model, data, held_out)
    # What the run reports is the fit on the held-out split alone, redone here by hand.
    with torch.no_grad():
        by_hand = scores.masked_temperature(model, held_out.x, held_out.y, (0.0, 0.5))
        test_logits = model(data.test_x)
    assert (seen["mask_ratio"], seen["mask_temperature"]) == by_hand
    assert seen["ece_masked"] == pytest.approx(
        scores.expected_calibration_error(test_logits / by_hand[1], data.test_y), abs=1e-6
    )
    # The check can fail: fitting on test images trips it.
    leaky = evaluate.HeldOut(data.test_x[:20], data.test_y[:20], (0.0,))
    with pytest.raises(AssertionError, match="test split read"):
        evaluate.tested(model, data, leaky)
