"""AST (Shen, Yang, Lam, arXiv 2310.10541): its expert options (gradient penalty, clipping loss,
learning-rate step) and its student options (heavy-ball momentum in both memory modes, balanced inner
loss, intermediate matching, start perturbation, representative init) against their formulas, each
off reproducing the earlier behaviour, and the method end to end on digits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condense.artifacts import ExpertBuffer
from condense.augment import dsa
from condense.config import DSAConfig, ExpertsConfig, ModelConfig, keyed
from condense.configure import load_config
from condense.errors import ConfigError
from condense.experts import ExpertObjective, clipping_scale, gradient_penalty, train_expert
from condense.methods.ast import ASTConfig
from condense.methods.base import DistillInputs
from condense.methods.initial import initial_images
from condense.methods.mtt import match_trajectories
from condense.methods.trajectory import (
    Segment,
    Waypoint,
    balanced_scale,
    draw_steps,
    inner_loss,
    intermediate_points,
    matched_gradient,
    perturbed_start,
    trajectory_loss,
)
from condense.models import ConvNet, FlatParams
from condense.progress import SILENT
from condense.stages import base
from condense.store import Store, load_arrays
from condense.training import student_model, train_on
from tests.conftest import (
    TINY,
    Notes,
    kill_distillation_at_first_checkpoint,
    plan_for,
    run_jobs,
    run_pipeline,
)
from tests.test_matching import MemoryCheckpoints

SMALL = ModelConfig(width=16)

# ----------------------------------------------------------------------------- expert options


def test_the_gradient_penalty_is_the_formula_on_a_linear_model():
    """f(x) = W vec(x) + c: d(sum of logits)/dx = sum_k W_k, the same for every image, so the penalty
    is lambda * mean over pixels of (||sum_k W_k[:, h, w]||_2 - 1)^2, and its gradient in W_k is
    lambda * 2 (n - 1) v / (n * pixels) for every class k (double backprop reaches the weights)."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 6)).double()
    x = torch.randn(7, 3, 4, 5, generator=generator, dtype=torch.float64)
    v = model[1].weight.detach().sum(0).reshape(3, 4, 5)
    n = v.pow(2).sum(0).sqrt()  # per pixel, over channels
    assert gradient_penalty(model, x, 2.0).item() == pytest.approx(
        (2.0 * (n - 1).pow(2).mean()).item(), rel=1e-12
    )

    (weight_grad,) = torch.autograd.grad(gradient_penalty(model, x, 2.0), model[1].weight)
    expected = (2.0 * 2 * (n - 1) / n * v / n.numel()).reshape(-1)
    assert torch.allclose(weight_grad, expected.expand(6, -1), rtol=1e-10)


def test_the_clipping_loss_scales_the_first_epochs_by_0_5_to_0_95():
    assert [clipping_scale(e, 10) for e in range(12)] == pytest.approx(
        [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.0], abs=1e-15
    )
    assert clipping_scale(0, 0) == 1.0


def test_a_clipped_first_epoch_is_a_half_size_sgd_epoch(digits30):
    """Without momentum, weight decay or penalty, the loss at half scale steps like half the learning
    rate: scaling by a power of two commutes with every floating-point operation, so bit for bit."""
    half = train_expert(
        digits30, SMALL, ExpertsConfig(epochs=1, lr=0.02, loss_decay_epochs=1), DSAConfig(), 0
    )
    plain = train_expert(digits30, SMALL, ExpertsConfig(epochs=1, lr=0.01), DSAConfig(), 0)
    assert np.array_equal(half.params, plain.params)
    assert half.train_loss[0] == pytest.approx(plain.train_loss[0] / 2, rel=1e-6)


def _earlier_expert(data, cfg: ExpertsConfig, seed: int) -> np.ndarray:
    """condense/experts.py's SGD loop before AST's options: plain cross-entropy, one optimizer."""
    model = student_model(data, SMALL, seed)
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    flat = FlatParams(model)
    generator = torch.Generator().manual_seed(seed)
    snapshots = [flat.flatten().numpy()]
    for _ in range(cfg.epochs):
        train_on(
            model,
            data.batches("train", cfg.batch_size, generator),
            F.cross_entropy,
            sgd,
            generator,
            DSAConfig(),
        )
        snapshots.append(flat.flatten().numpy())
    return np.stack(snapshots)


def test_expert_options_off_reproduce_the_earlier_experts_and_on_change_them(digits30):
    base_cfg = ExpertsConfig(epochs=6, lr=0.01, momentum=0.9, weight_decay=1e-3, batch_size=100)
    earlier = _earlier_expert(digits30, base_cfg, seed=3)
    now = train_expert(digits30, SMALL, base_cfg, DSAConfig(), seed=3).params
    assert now.tobytes() == earlier.tobytes()
    for option in ({"gradient_penalty": 2.0}, {"loss_decay_epochs": 2}, {"lr_step_factor": 0.6}):
        changed = train_expert(
            digits30, SMALL, base_cfg.model_copy(update=option), DSAConfig(), seed=3
        ).params
        assert not np.allclose(changed[-1], now[-1]), option
        if "lr_step_factor" in option:  # the step follows epoch epochs // 2 + 2 = 5 (1-based): only 6 moves
            assert changed[:6].tobytes() == now[:6].tobytes()


def test_the_penalty_sees_the_batch_before_augmentation(digits30):
    """The loop augments what the objective's batches yield; the penalty uses the batch as drawn."""
    model = student_model(digits30, SMALL, 0)
    objective = ExpertObjective(model, 1.0)
    x, y = digits30.train_x[:50], digits30.train_y[:50]
    ((drawn, _),) = list(objective.batches([(x, y)]))
    augmented = dsa(drawn, DSAConfig(), 5)
    cross_entropy = F.cross_entropy(model(augmented), y)
    clean = cross_entropy + gradient_penalty(model, x, 1.0)
    assert objective(model(augmented), y).item() == pytest.approx(clean.item(), rel=1e-6)
    on_augmented = cross_entropy + gradient_penalty(model, augmented, 1.0)
    assert abs(clean.item() - on_augmented.item()) > 1e-4


def test_expert_options_enter_the_expert_key_only_when_on(tmp_path: Path):
    store = Store(tmp_path)
    key = {}
    for label, extra in {
        "default": [],
        "neutral": ["experts.gradient_penalty=0", "experts.loss_decay_epochs=0", "experts.lr_step_factor=1"],
        "penalty": ["experts.gradient_penalty=2"],
        "clipping": ["experts.loss_decay_epochs=3"],
        "step": ["experts.lr_step_factor=0.6"],
    }.items():
        key[label] = plan_for(store, load_config("digits-mtt", [*TINY, *extra])).keys["experts"]
    assert key["neutral"] == key["default"]
    assert len({key["default"], key["penalty"], key["clipping"], key["step"]}) == 4
    assert not {"gradient_penalty", "loss_decay_epochs", "lr_step_factor"} & set(keyed(ExpertsConfig()))


# ----------------------------------------------------------------------------- the student's unroll


def _problem(steps: int, momentum: float, learned: bool = False, scale: float = 1.0, waypoints: bool = False):
    torch.manual_seed(0)
    net = FlatParams(ConvNet(1, 3, 8, ModelConfig(width=8, depth=2)))
    start = net.flatten().double()
    net.module.double()
    target = start + 0.05 * torch.randn_like(start)
    middles = tuple(
        Waypoint(m, start + 0.02 * m * torch.randn_like(start)) for m in (2, 4) if waypoints and m < steps
    )
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    targets = torch.randn(6, 3, dtype=torch.float64) if learned else torch.tensor([0, 0, 1, 1, 2, 2])
    plan = draw_steps(len(images), steps, 4, torch.Generator().manual_seed(1))
    augment = DSAConfig(strategy="color_crop_cutout_scale_rotate")
    segment = Segment(net, start, target, plan, augment, 100, momentum, scale, middles)
    return segment, images, targets


def _leaves(images: torch.Tensor, targets: torch.Tensor, learned: bool):
    images = images.clone().requires_grad_(True)
    targets = targets.clone().requires_grad_(learned)
    return images, targets, torch.tensor(0.05, dtype=torch.float64, requires_grad=True)


def _matched(memory: str, segment: Segment, images, targets, learned: bool):
    images, targets, lr = _leaves(images, targets, learned)
    loss = matched_gradient(segment, images, targets, lr, memory)
    return loss, images.grad, targets.grad, lr.grad


def _brute_force(segment: Segment, images, targets, learned: bool, momentum: float, scale: float):
    """The formula written out and differentiated by autograd through every step: b_i = mu b_{i-1} + g_i,
    theta_{i+1} = theta_i - a b_i, loss = final distance + the waypoints' distances."""
    images, targets, lr = _leaves(images, targets, learned)
    theta = segment.start.clone().requires_grad_(True)
    velocity = torch.zeros_like(theta)
    loss = torch.zeros((), dtype=torch.float64)
    middle = {w.steps: w.target for w in segment.waypoints}
    for i, step in enumerate(segment.steps):
        x = dsa(images[step.indices], segment.augment, step.seed)
        inner = scale * inner_loss(segment.net(theta, x), targets[step.indices])
        (g,) = torch.autograd.grad(inner, theta, create_graph=True)
        velocity = momentum * velocity + g
        theta = theta - lr * velocity
        if i + 1 in middle:
            loss = loss + trajectory_loss(theta, segment.start, middle[i + 1], segment.matched_from)
    loss = loss + trajectory_loss(theta, segment.start, segment.target, segment.matched_from)
    loss.backward()
    return loss.detach(), images.grad, targets.grad, lr.grad


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
@pytest.mark.parametrize(
    ("steps", "learned", "waypoints"), [(1, False, False), (5, False, True), (6, True, True)]
)
def test_the_momentum_students_gradient_is_the_brute_force_one(memory, steps, learned, waypoints):
    """Heavy ball, balanced scale and waypoints together, in float64: loss and the gradients of the
    pixels, the learned labels and the step size equal autograd's through the written-out unroll."""
    segment, images, targets = _problem(steps, 0.9, learned, 1.3, waypoints)
    expected = _brute_force(segment, images, targets, learned, 0.9, 1.3)
    got = _matched(memory, segment, images, targets, learned)
    assert got[0].item() == pytest.approx(expected[0].item(), rel=1e-12)
    for exact, computed in zip(expected[1:], got[1:], strict=True):
        if exact is None:
            assert computed is None
            continue
        assert exact.abs().max() > 0
        assert torch.allclose(computed, exact, rtol=1e-9, atol=1e-13)


def test_momentum_and_waypoints_change_the_gradient():
    """So the equality above is not trivially true of MTT's plain SGD."""
    plain = _matched("unrolled", *_problem(5, 0.0)[:3], learned=False)[1]
    heavy = _matched("unrolled", *_problem(5, 0.9)[:3], learned=False)[1]
    middle = _matched("unrolled", *_problem(5, 0.0, waypoints=True)[:3], learned=False)[1]
    for other in (heavy, middle):
        assert ((other - plain).norm() / plain.norm()).item() > 1e-3


@pytest.mark.parametrize("learned", [False, True])
def test_with_every_option_off_the_unroll_is_mtts_bit_for_bit(learned):
    """Momentum 0, scale 1, no waypoints: exactly the plain-SGD unroll (the brute force without its
    zero terms is MTT's code: theta - a * g at every step, one normalised distance)."""
    segment, images, targets = _problem(5, 0.0, learned)
    leaves = _leaves(images, targets, learned)
    theta = segment.start.clone().requires_grad_(True)
    for step in segment.steps:
        x = dsa(leaves[0][step.indices], segment.augment, step.seed)
        (g,) = torch.autograd.grad(
            inner_loss(segment.net(theta, x), leaves[1][step.indices]), theta, create_graph=True
        )
        theta = theta - leaves[2] * g
    loss = trajectory_loss(theta, segment.start, segment.target, segment.matched_from)
    loss.backward()
    got = _matched("unrolled", segment, images, targets, learned)
    assert torch.equal(got[0], loss.detach())
    assert torch.equal(got[1], leaves[0].grad) and torch.equal(got[3], leaves[2].grad)
    if learned:
        assert torch.equal(got[2], leaves[1].grad)


def test_the_balanced_scale_is_a_step_size_for_plain_sgd():
    """theta - a * grad(c * loss) = theta - (c * a) * grad loss: same loss, same pixel gradient."""
    scaled, images, targets = _problem(4, 0.0, scale=1.5)
    plain = Segment(scaled.net, scaled.start, scaled.target, scaled.steps, scaled.augment, 100)
    a, b, _, _ = _matched("unrolled", scaled, images, targets, False)
    images2, _, _ = _leaves(images, targets, False)
    loss = matched_gradient(plain, images2, targets, torch.tensor(0.075, dtype=torch.float64), "unrolled")
    assert a.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(b, images2.grad, rtol=1e-9, atol=1e-14)


def test_the_balanced_factor_is_asts_logarithm():
    assert balanced_scale(10, 20) == pytest.approx(math.log(8, 5))
    assert balanced_scale(20, 20) == pytest.approx(math.log(18, 5))
    assert balanced_scale(0, 20) == pytest.approx(1 / math.log(18, 5))
    assert balanced_scale(9, 20) == pytest.approx(1 / math.log(9, 5))
    assert balanced_scale(0, 20) < 1 < balanced_scale(10, 20)


def test_waypoints_split_the_unroll_by_expert_epochs():
    assert intermediate_points(30, 2) == [(15, 1)]
    assert intermediate_points(40, 3) == [(13, 1), (26, 2)]
    assert intermediate_points(20, 1) == []
    assert intermediate_points(1, 2) == []  # AST's loop never matches at step 0
    segment = _problem(3, 0.0)[0]
    with pytest.raises(ValueError, match="strictly inside"):
        Segment(
            segment.net,
            segment.start,
            segment.target,
            segment.steps,
            segment.augment,
            0,
            0,
            1,
            (Waypoint(3, segment.target),),
        )


def test_the_start_perturbation_scales_unit_noise_by_each_convolution_weight():
    net = FlatParams(ConvNet(1, 3, 8, ModelConfig(width=8, depth=2)))
    start = net.flatten()
    moved = perturbed_start(net, start, 0.5, torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(4)
    for before, after, shape in zip(
        torch.split(start, net.sizes), torch.split(moved, net.sizes), net.shapes, strict=True
    ):
        if len(shape) == 4:
            noise = torch.randn(before.shape, generator=replay)
            assert torch.allclose(after, before + 0.5 * noise / noise.norm() * before, rtol=1e-6, atol=1e-9)
            assert not torch.equal(after, before)
        else:
            assert torch.equal(after, before)


# ----------------------------------------------------------------------------- representative init


def test_representative_init_at_ipc_1_is_the_image_nearest_each_class_mean_logit(digits30):
    """One cluster per class: its centroid is the class's mean logit vector, so the pick is the image
    whose logits are nearest it (and not, in general, the one nearest the mean feature: kmeans)."""
    encoder = student_model(digits30, SMALL, seed=7)
    picked = initial_images(
        digits30, 1, "representative", torch.Generator().manual_seed(0), lambda seed: encoder
    )
    by_features = initial_images(
        digits30, 1, "kmeans", torch.Generator().manual_seed(0), lambda seed: encoder
    )
    with torch.no_grad():
        for c in range(digits30.num_classes):
            members = digits30.train_x[digits30.train_y == c]
            logits = encoder(members)
            nearest = (logits - logits.mean(0)).pow(2).sum(1).argmin()
            assert torch.equal(picked[c], members[nearest])
    assert not torch.equal(picked, by_features)


# ----------------------------------------------------------------------------- the method


def test_ast_refuses_experts_that_are_not_smooth():
    with pytest.raises(ConfigError, match="ast distils from smooth experts"):
        load_config("digits-ast", ["experts.gradient_penalty=0", "experts.loss_decay_epochs=0"])


AST_TINY = [
    *TINY,
    "model.width=32",
    "experts.loss_decay_epochs=1",
    "distill.expert_epochs=2",
    "distill.syn_steps=6",
]


def test_a_killed_ast_distillation_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    cfg = load_config("digits-ast", AST_TINY)
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    key = plan.keys["distill"]
    kill_distillation_at_first_checkpoint(store, cfg, plan, monkeypatch)
    assert base.TorchCheckpoints(store.partial("distill", key) / "checkpoint.pt").load()["iteration"] == 2

    notes = Notes()
    run_jobs(store, cfg, plan, {"distill"}, notes)
    assert any("resuming AST from checkpoint at iteration 2/6" in n for n in notes.lines)
    resumed = load_arrays(store.path("distill", key) / "synthetic.zarr")["images"]

    fresh = Store(tmp_path / "fresh")
    fresh_plan = plan_for(fresh, cfg)
    run_jobs(fresh, cfg, fresh_plan, {"experts", "distill"})
    assert fresh_plan.keys["distill"] == key
    uninterrupted = load_arrays(fresh.path("distill", key) / "synthetic.zarr")["images"]
    assert np.isfinite(resumed).all()
    assert resumed.tobytes() == uninterrupted.tobytes()
    assert store.meta("distill", key)["lr"] == fresh.meta("distill", key)["lr"]


def test_asts_matching_loss_falls(digits30):
    """Small AST experts (every expert option on) and a fixed start epoch, so that the loss's fall is
    the images' doing, not the draw of segments."""
    cfg = load_config("digits-ast")
    experts = cfg.experts.model_copy(update={"epochs": 3, "loss_decay_epochs": 1})
    buffer = ExpertBuffer(
        np.stack([train_expert(digits30, SMALL, experts, cfg.dsa, seed=s).params for s in (0, 1)])
    )
    method = ASTConfig(iterations=40, syn_steps=6, max_start_epoch=0, lr_lr=1e-5, checkpoint_every=100)
    inputs = DistillInputs(digits30, 1, 0, method, SMALL, cfg.dsa, buffer)
    losses = [h["loss"] for h in match_trajectories(inputs, MemoryCheckpoints(), SILENT, "AST").history]
    # Here: 2.25 over the first 3 iterations, 1.84 over the last 10.
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:3]), losses


def test_ast_beats_random_real_digits(tmp_path: Path):
    # The CPU recipe at IPC 1, evaluated by 2 networks (the random-real baseline by the same recipe).
    cfg = load_config(
        "digits-ast",
        ["compute.device=cpu", "evaluate.seeds=2", "evaluate.full_data=false", "evaluate.mask_ratios=[]"],
    )
    summary = run_pipeline(Store(tmp_path), cfg)
    distilled = summary["accuracy"]["convnet"]["mean"]
    random_real = summary["baselines"]["random_real"]["mean"]
    assert distilled > random_real + 10, (distilled, random_real)
