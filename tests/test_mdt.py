"""Masked distillation training (MDT, Zhu et al., ICCV 2023; our reading, the paper's code is not
public): the Bernoulli mask on the student's synthetic batches, neutral at 0, the gradient through
it in both memory modes (trajectory matching and BPTT), and the option end to end on digits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from condense.artifacts import ExpertBuffer
from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig, keyed
from condense.configure import load_config
from condense.experts import train_expert
from condense.methods import bptt
from condense.methods.base import DistillInputs
from condense.methods.mtt import MTTConfig, match_trajectories
from condense.methods.ratbptt import RaTBPTTConfig
from condense.methods.trajectory import (
    Step,
    _step_gradient,
    inner_loss,
    masked_inputs,
    matched_gradient,
)
from condense.models import FlatParams
from condense.progress import SILENT
from tests.test_bptt import _tiny_problem
from tests.test_matching import MemoryCheckpoints
from tests.test_trajectory import _problem


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the mask


def test_the_mask_zeroes_a_share_t_of_the_values_fixed_by_the_seed():
    x = torch.ones(64, 3, 32, 32)
    masked = masked_inputs(x, 0.3, seed=7)
    assert abs((masked == 0).double().mean().item() - 0.3) < 0.02
    assert set(masked.unique().tolist()) == {0.0, 1.0}  # no rescaling of the kept values
    assert torch.equal(masked, masked_inputs(x, 0.3, seed=7))
    assert not torch.equal(masked, masked_inputs(x, 0.3, seed=8))
    # Not the DSA's draws: the mask's seed is the step's seed mixed with a stream of its own.
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(masked, x * (torch.rand(x.shape, generator=g) >= 0.3))
    assert masked_inputs(x, 0.0, seed=7) is x


def test_the_option_is_off_by_default_and_out_of_the_key_until_used():
    for config in (MTTConfig, RaTBPTTConfig):
        assert config().mask_ratio == 0
        assert "mask_ratio" not in keyed(config())
        assert keyed(config(mask_ratio=0.3))["mask_ratio"] == 0.3
        with pytest.raises(ValueError):
            config(mask_ratio=1.0)
    assert load_config("digits-ast", ["distill.mask_ratio=0.3"]).distill.mask_ratio == 0.3


# ----------------------------------------------------------------------------- trajectory matching


def test_mask_ratio_0_is_the_unmasked_student_step_bit_for_bit():
    segment, images, targets = _problem(3, learned=False)
    assert segment.mask_ratio == 0
    for step in segment.steps:
        theta = segment.start.clone().requires_grad_(True)
        got = _step_gradient(segment, theta, images, targets, step, create_graph=False)
        x = dsa(images[step.indices], segment.augment, step.seed)
        (want,) = torch.autograd.grad(inner_loss(segment.net(theta, x), targets[step.indices]), theta)
        assert torch.equal(got, want)


def _one_step(memory: str, ratio: float):
    """One student step over all 6 images, with an augmentation that leaves them as they are, so a
    pixel's gradient is its masked batch position's."""
    segment, images, targets = _problem(1, learned=False)
    segment = dataclasses.replace(
        segment,
        steps=[Step(torch.randperm(6, generator=torch.Generator().manual_seed(2)), 1234)],
        augment=DSAConfig(strategy="flip", flip=0.0),
        mask_ratio=ratio,
    )
    images.requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    matched_gradient(segment, images, targets, lr, memory)
    return segment, images


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
def test_the_gradient_reaches_only_the_kept_pixels(memory):
    segment, images = _one_step(memory, 0.3)
    (step,) = segment.steps
    kept = masked_inputs(torch.ones(6, 1, 8, 8, dtype=torch.float64), 0.3, step.seed) != 0
    grad = images.grad[step.indices]
    assert (grad[~kept] == 0).all()
    assert (grad[kept] != 0).double().mean() > 0.9
    assert 0.2 < (~kept).double().mean() < 0.4
    # Without the mask, those pixels have a gradient.
    _, plain = _one_step(memory, 0.0)
    assert (plain.grad[step.indices][~kept] != 0).double().mean() > 0.9


def _gradients(memory: str, ratio: float, learned: bool):
    segment, images, targets = _problem(5, learned, matched_from=100)
    segment = dataclasses.replace(segment, mask_ratio=ratio)
    images.requires_grad_(True)
    if learned:
        targets.requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = matched_gradient(segment, images, targets, lr, memory)
    return loss, images.grad, targets.grad if learned else None, lr.grad


@pytest.mark.parametrize("learned", [False, True])
def test_both_memory_modes_give_the_same_masked_gradient(learned):
    unrolled = _gradients("unrolled", 0.3, learned)
    constant = _gradients("constant", 0.3, learned)
    assert torch.allclose(unrolled[0], constant[0], rtol=1e-12)
    for exact, walked in zip(unrolled[1:], constant[1:], strict=True):
        if exact is None:
            assert walked is None
            continue
        assert exact.abs().max() > 0
        assert torch.allclose(exact, walked, rtol=1e-9, atol=1e-12)
    # The mask is used: the unmasked gradient is another one.
    assert not torch.allclose(unrolled[1], _gradients("unrolled", 0.0, learned)[1])


# ----------------------------------------------------------------------------- BPTT


def _bptt_gradient(memory: str, ratio: float) -> torch.Tensor:
    mlp, images, real, real_labels, _ = _tiny_problem()
    net = FlatParams(mlp)
    steps = [Step(torch.tensor(i), 10 + k) for k, i in enumerate(([0, 2], [1, 3], [0, 3], [1, 2], [0, 1]))]
    inner = bptt.Inner(net, net.flatten(), steps, bptt.Adam(0.05), None, ratio)
    x = images.clone().requires_grad_(True)
    bptt.window_gradient(inner, 1, real, real_labels, x, torch.tensor([0, 0, 1, 1]), memory)
    assert x.grad is not None
    return x.grad


def test_bptts_masked_gradient_is_the_same_in_both_memory_modes():
    """(At 0 the inner run is the one tests/test_bptt.py checks against brute force.)"""
    unrolled = _bptt_gradient("unrolled", 0.5)
    assert unrolled.abs().max() > 1e-4
    torch.testing.assert_close(_bptt_gradient("constant", 0.5), unrolled, rtol=1e-9, atol=1e-12)
    assert (_bptt_gradient("unrolled", 0.0) - unrolled).abs().max() > 1e-4


def _bptt_gradient_of(steps: list[Step], ratio: float) -> torch.Tensor:
    mlp, images, real, real_labels, _ = _tiny_problem()
    net = FlatParams(mlp)
    x = images.clone().requires_grad_(True)
    inner = bptt.Inner(net, net.flatten(), steps, bptt.Adam(0.05), None, ratio)
    bptt.window_gradient(inner, 0, real, real_labels, x, torch.tensor([0, 0, 1, 1]), "unrolled")
    assert x.grad is not None
    return x.grad


def test_bptts_gradient_reaches_only_the_kept_pixels():
    steps = [Step(torch.tensor([0, 1, 2, 3]), 5)]
    grad = _bptt_gradient_of(steps, 0.5)
    kept = masked_inputs(torch.ones(4, 1, 2, 2, dtype=torch.float64), 0.5, 5) != 0
    assert 0 < kept.sum() < kept.numel()
    assert (grad[~kept] == 0).all()
    assert (grad[kept] != 0).all()


# ----------------------------------------------------------------------------- end to end


def test_a_short_masked_mtt_run_on_digits_is_deterministic_and_differs_from_the_unmasked_one(digits30):
    cfg = load_config("digits-mtt")
    model = ModelConfig(width=16)
    experts = cfg.experts.model_copy(update={"epochs": 2})
    buffer = ExpertBuffer(np.stack([train_expert(digits30, model, experts, cfg.dsa, seed=0).params]))

    def run(ratio: float) -> torch.Tensor:
        settings = {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 1, "checkpoint_every": 100}
        method = MTTConfig(iterations=3, mask_ratio=ratio, **settings)
        inputs = DistillInputs(digits30, 1, 0, method, model, cfg.dsa, buffer)
        return match_trajectories(inputs, MemoryCheckpoints(), SILENT, "MTT").images

    masked = run(0.3)
    assert torch.isfinite(masked).all()
    assert torch.equal(masked, run(0.3))
    assert not torch.equal(masked, run(0.0))
