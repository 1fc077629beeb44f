"""The trajectory-matching core: TESLA's constant-memory gradient against the unrolled one, DATM's
start window, PAD's shallow cut, learned labels."""

import pytest
import torch

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig
from condense.methods.trajectory import (
    Segment,
    draw_steps,
    inner_loss,
    matched_gradient,
    shallow_cut,
    start_window,
    trajectory_loss,
)
from condense.models import ConvNet, FlatParams


def test_trajectory_loss_is_normalised_by_the_expert_segment():
    start, target = torch.zeros(5), torch.ones(5)
    assert trajectory_loss(target, start, target) == 0
    assert trajectory_loss(start, start, target) == 1
    assert trajectory_loss(2 * target, start, target) == 1
    # Only the matched tail counts: an error in the left-out head changes nothing.
    student = torch.tensor([9.0, 9.0, 1.0, 1.0, 2.0])
    assert trajectory_loss(student, start, target, matched_from=2) == pytest.approx(1 / 3)


def _problem(steps: int, learned: bool, matched_from: int = 0):
    torch.manual_seed(0)
    net = FlatParams(ConvNet(1, 3, 8, ModelConfig(width=8, depth=2)))
    start = net.flatten().double()
    net.module.double()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    hard = torch.tensor([0, 0, 1, 1, 2, 2])
    targets = torch.randn(6, 3, dtype=torch.float64) if learned else hard
    plan = draw_steps(len(images), steps, 4, torch.Generator().manual_seed(1))
    dsa = DSAConfig(strategy="color_crop_cutout_scale_rotate")
    return Segment(net, start, target, plan, dsa, matched_from), images, targets


def _gradients(memory: str, steps: int, learned: bool, matched_from: int = 0):
    segment, images, targets = _problem(steps, learned, matched_from)
    images.requires_grad_(True)
    if learned:
        targets.requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = matched_gradient(segment, images, targets, lr, memory)
    return loss, images.grad, targets.grad if learned else None, lr.grad


@pytest.mark.parametrize("steps", [1, 5, 9])
@pytest.mark.parametrize("learned", [False, True])
def test_constant_memory_gradient_equals_the_unrolled_one(steps, learned):
    """TESLA's walk with the Hessian terms kept is exact: same loss, same gradient for the pixels,
    the learned labels and the step size (float64 so rounding cannot hide a missing term)."""
    unrolled = _gradients("unrolled", steps, learned, matched_from=100)
    constant = _gradients("constant", steps, learned, matched_from=100)
    assert torch.allclose(unrolled[0], constant[0], rtol=1e-12)
    for exact, walked in zip(unrolled[1:], constant[1:], strict=True):
        if exact is None:
            assert walked is None
            continue
        assert exact.abs().max() > 0
        assert torch.allclose(exact, walked, rtol=1e-9, atol=1e-12)


def test_dropping_the_cross_step_terms_as_tesla_does_would_differ():
    """The cross-step terms matter (so the equality above is not trivially true): with several steps
    the pixel gradient differs from the sum of per-step terms at the final adjoint."""
    segment, images, targets = _problem(5, learned=False)
    lr = 0.05
    thetas = [segment.start]
    for step in segment.steps:
        theta = thetas[-1].detach().requires_grad_(True)
        idx = step.indices
        loss = inner_loss(segment.net(theta, dsa(images[idx], segment.augment, step.seed)), targets[idx])
        (g,) = torch.autograd.grad(loss, theta)
        thetas.append((theta - lr * g).detach())
    end = thetas[-1].requires_grad_(True)
    (adjoint,) = torch.autograd.grad(trajectory_loss(end, segment.start, segment.target), end)
    approx = torch.zeros_like(images)
    leaf = images.clone().requires_grad_(True)
    for theta, step in zip(thetas[:-1], segment.steps, strict=True):
        theta = theta.detach().requires_grad_(True)
        idx = step.indices
        loss = inner_loss(segment.net(theta, dsa(leaf[idx], segment.augment, step.seed)), targets[idx])
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (part,) = torch.autograd.grad(-lr * (adjoint * g).sum(), leaf)
        approx += part
    exact = _gradients("unrolled", 5, learned=False)[1]
    relative = ((approx - exact).norm() / exact.norm()).item()
    print(f"\nTESLA without cross-step terms, 5 steps: pixel-gradient error {relative:.2e}")
    assert relative > 1e-6


def test_start_window_grows_from_its_initial_to_its_final_upper_end():
    assert start_window(0, 0, 19, 9, 1000) == (0, 9)
    assert start_window(500, 0, 19, 9, 1000) == (0, 14)
    assert start_window(1000, 0, 19, 9, 1000) == (0, 19)
    assert start_window(5000, 0, 19, 9, 1000) == (0, 19)
    assert start_window(0, 2, 7, None, 1000) == (2, 7)  # MTT: fixed


def test_shallow_cut_leaves_out_whole_leading_tensors_up_to_the_fraction():
    net = FlatParams(ConvNet(3, 10, 32))  # ConvNet-3, CIFAR size
    assert shallow_cut(net, 0.0) == 0
    half = shallow_cut(net, 0.5)
    assert half <= 0.5 * net.numel
    assert half in {sum(net.sizes[:k]) for k in range(len(net.sizes) + 1)}
    # the next tensor would cross the fraction
    k = [sum(net.sizes[:i]) for i in range(len(net.sizes) + 1)].index(half)
    assert half + net.sizes[k] > 0.5 * net.numel
    assert net.names[0].startswith("features.0")  # network order: the first tensor is the shallowest


def test_inner_loss_on_learned_labels_is_soft_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    label_logits = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.softmax(label_logits, 1)
    expected = -(p * torch.log_softmax(logits, 1)).sum()
    assert inner_loss(logits, label_logits) == pytest.approx(expected.item())
    assert inner_loss(logits, torch.tensor([0])) == pytest.approx(-torch.log_softmax(logits, 1)[0, 0].item())
