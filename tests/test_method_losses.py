"""Each method lowers its own objective on a tiny digits case, and the formulas the methods share
with their papers hold on constructed cases."""

from __future__ import annotations

import math
from statistics import mean

import pytest
import torch
from torch import nn

from condense import artifacts
from condense.config import ModelConfig
from condense.configure import load_config
from condense.methods import cda, cudd, get_method, recover
from condense.methods.base import DistillInputs
from condense.prepare import PreparedDataset, load
from condense.progress import SILENT
from condense.store import Store
from tests.conftest import TINY, record_experts
from tests.test_matching import MemoryCheckpoints


def _falls(losses: list[float], ratio: float) -> bool:
    """The last three losses average below ``ratio`` times the first three."""
    return mean(losses[-3:]) < ratio * mean(losses[:3])


@pytest.mark.parametrize(
    ("name", "settings", "ratio"),
    [
        ("dm", {"iterations": 10, "batch_real": 8}, 0.5),
        ("dsa", {"iterations": 12, "outer_loop": 1, "inner_loop": 1, "batch_real": 8}, 0.8),
        ("dream", {"base": "dm", "iterations": 10, "batch_real": 5, "interval": 5}, 0.5),
    ],
)
def test_a_matching_method_lowers_its_matching_loss_from_noise(
    digits30: PreparedDataset, name, settings, ratio
):
    method = get_method(name)
    cfg = method.config_cls(**settings, init="noise")
    inputs = DistillInputs(digits30, 2, 0, cfg, ModelConfig(width=16), load_config("digits-mtt").dsa)
    losses = [h["loss"] for h in method.distill(inputs, MemoryCheckpoints(), SILENT).history]
    assert _falls(losses, ratio), losses


def test_mtt_lowers_the_trajectory_matching_loss_from_noise(tmp_path):
    cfg = load_config("digits-mtt", TINY)
    store = Store(tmp_path)
    dataset_key, experts_key = record_experts(store, cfg)
    mtt = get_method("mtt")
    settings = mtt.config_cls(iterations=10, syn_steps=4, max_start_epoch=2, init="noise")
    buffer = artifacts.load_buffer(store, experts_key)
    inputs = DistillInputs(load(store, dataset_key), 1, 0, settings, cfg.model, cfg.dsa, experts=buffer)
    losses = [h["loss"] for h in mtt.distill(inputs, MemoryCheckpoints(), SILENT).history]
    assert _falls(losses, 0.6), losses


RECOVER = {"iterations": 12, "checkpoint_every": 5, "jitter": 1, "crop_min_scale": 0.5, "r_bn": 0.1}


def _recover_inputs(data, observer, cfg) -> DistillInputs:
    model = ModelConfig(width=16, norm="batchnorm")
    return DistillInputs(data, 1, 0, cfg, model, load_config("digits-mtt").dsa, teacher=observer)


def test_cda_lowers_the_recovery_loss(digits30, bn_teacher):
    cfg = cda.CDAConfig(**{**RECOVER, "iterations": 40})  # a new crop every step: a noisy loss
    result = cda.distill(_recover_inputs(digits30, bn_teacher.model, cfg), MemoryCheckpoints())
    assert _falls([h["loss"] for h in result.history], 0.8)


def test_cudd_lowers_its_loss_in_the_first_curriculum(digits30, bn_teacher):
    # Without random crops, flips and shifts the objective is the same function at every step.
    still = {"iterations": 20, "crop": False, "flip": False, "jitter": 0, "r_bn": 0.1}
    cfg = cudd.CUDDConfig(**still, curricula=[1], student_epochs=1)
    result = cudd.distill(_recover_inputs(digits30, bn_teacher.model, cfg), MemoryCheckpoints())
    assert _falls([h["loss"] for h in result.history], 0.85)


@pytest.mark.parametrize(
    ("iteration", "linear", "cosine"), [(25, 0.77, 0.08 + 0.92 * (1 + math.cos(math.pi / 4)) / 2)]
)
def test_cda_cosine_and_linear_schedules_differ_where_the_curves_do(iteration, linear, cosine):
    at = {
        schedule: recover.crop_min_scale(iteration, 100, cda.CDAConfig(crop_curriculum=schedule))
        for schedule in ("linear", "cosine")
    }
    assert at["linear"] == pytest.approx(linear) and at["cosine"] == pytest.approx(cosine)
    assert at["cosine"] - at["linear"] > 0.09  # a quarter of the way, cosine is still near the whole image


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_cudds_adversarial_term_equals_its_formula():
    labels = torch.tensor([0, 1, 2])
    student_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    # The teacher is right on images 0 and 2, wrong on image 1: only 0 and 2 get the push.
    teacher_logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    p = torch.softmax(student_logits, dim=1)
    expected = (-math.log(1 - float(p[0, 0])) - math.log(1 - float(p[2, 2]))) / 2
    got = cudd.adversarial_loss(FixedLogits(student_logits), torch.zeros(3, 1, 2, 2), labels, teacher_logits)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # And zero push when the teacher is wrong everywhere.
    wrong = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    assert float(cudd.adversarial_loss(FixedLogits(student_logits), torch.zeros(3), labels, wrong)) == 0.0
