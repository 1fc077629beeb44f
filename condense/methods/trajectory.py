"""Trajectory matching's inner problem, shared by MTT and its successors (FTD, DATM, PAD, AST).

A segment starts a student at an expert's parameters theta*_t and takes N steps on synthetic batches
with the learnable step size a, heavy-ball momentum mu (0 for MTT: plain SGD; AST's student: 0.9):

    theta_0 = theta*_t,   b_i = mu * b_{i-1} + g_i  (b_{-1} = 0),   theta_{i+1} = theta_i - a * b_i,
    g_i = grad_theta  c * loss(f(theta_i; A_i(x[B_i])), y[B_i])

(B_i: the i-th batch of synthetic images, A_i: its DSA transform, y: hard labels or DATM's learned
label logits, c: AST's balanced-loss factor, 1 otherwise; with ``mask_ratio`` t > 0, MDT's input
M_i * A_i(x[B_i]) instead, M_i a fresh 0/1 mask keeping each value with probability 1 - t, see
:func:`masked_inputs`). The matching loss is MTT's normalised
distance to the expert's later point, plus AST's intermediate matching losses at waypoints
(student step m_k against expert epoch t+k; none for MTT),

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2
        + sum_k ||theta_{m_k} - theta*_{t+k}||^2 / ||theta*_t - theta*_{t+k}||^2,

each taken over the parameters from ``matched_from`` on (PAD leaves the shallowest out). Its gradient
with respect to the pixels, the labels and a is computed one of two ways, with the same result:

- ``unrolled`` (MTT): every step keeps its graph and one backward pass runs through all of them.
  Memory grows linearly with N (each step keeps its activations and its gradient's graph).
- ``constant`` (TESLA, Cui et al. ICML 2023): the N steps run forward without graphs; then the steps
  are walked backwards with the adjoints lambda_i = dL/dtheta_i and nu_i = dL/db_i = -a * k_i
  (reverse mode written out; k_N = 0)::

      lambda_N  = dL/dtheta_N
      k_i       = lambda_{i+1} + mu * k_{i+1}
      dL/dx    += -a * k_i . dg_i/dx          (and dL/dy the same way, for learned labels)
      dL/da    += -lambda_{i+1} . b_i
      lambda_i  = lambda_{i+1} - a * H_i k_i  (+ the waypoint's dL/dtheta_i where i = m_k)

  With mu = 0, k_i = lambda_{i+1}: plain SGD's walk. The terms of step i come from one double
  backward of ``k_i . g_i`` at theta_i, so one step's graph is alive at a time: activation memory
  does not depend on N.

  Deviation from TESLA's official code, stated: it treats every lambda_i as lambda_N, dropping the
  H_i terms (how batch i moves the parameters later batches see). This walk keeps them, so it is
  exact: it equals the unrolled gradient up to floating-point rounding (tests/test_trajectory.py,
  tests/test_ast.py). The cost is the same double backward per step TESLA pays (the Hessian-vector
  product rides along) plus one recomputed forward step: (theta_i, b_{i-1}) are checkpointed every
  ceil(sqrt(N)) steps and recomputed segment by segment in the backward walk, so parameter memory is
  O(sqrt(N) * P), not TESLA's N * P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from condense.augment import dsa
from condense.config import DSAConfig
from condense.devices import upload
from condense.models import FlatParams
from condense.training import derived_seed, random_seed

Memory = Literal["unrolled", "constant"]


@dataclass(frozen=True)
class Step:
    """One inner step's draws: which synthetic images, and the seed of their DSA transform."""

    indices: torch.Tensor
    seed: int


@dataclass(frozen=True)
class Waypoint:
    """AST's intermediate matching: after ``steps`` student steps, the student is also matched to the
    expert's parameters ``target`` (normalised by the start's distance to them)."""

    steps: int
    target: torch.Tensor


@dataclass(frozen=True)
class Segment:
    """One iteration's matching problem: where the student starts, where it must arrive, its steps."""

    net: FlatParams
    start: torch.Tensor
    target: torch.Tensor
    steps: list[Step]
    augment: DSAConfig
    matched_from: int = 0
    """Parameters before this flat index are left out of the loss (PAD's shallow layers)."""
    momentum: float = 0.0
    """The student's heavy-ball momentum mu (AST); 0: MTT's plain SGD."""
    loss_scale: float = 1.0
    """Factor c on the inner loss (AST's balanced inner loss)."""
    waypoints: tuple[Waypoint, ...] = ()
    """AST's intermediate matching points, each with 0 < steps < len(steps)."""
    mask_ratio: float = 0.0
    """MDT: the share t of each augmented batch's input values zeroed (:func:`masked_inputs`); 0: none."""

    def __post_init__(self) -> None:
        if any(not 0 < w.steps < len(self.steps) for w in self.waypoints):
            raise ValueError(f"waypoints must fall strictly inside the {len(self.steps)} steps")


def draw_steps(n: int, steps: int, batch: int, generator: torch.Generator) -> list[Step]:
    """Batches walk through random permutations of the ``n`` images (a new one when one runs out);
    each batch draws its DSA seed right after its indices, the order MTT's loop always used."""
    order = torch.empty(0, dtype=torch.long)
    drawn = []
    for _ in range(steps):
        if len(order) == 0:
            order = torch.randperm(n, generator=generator)
        indices, order = order[:batch], order[batch:]
        drawn.append(Step(indices, random_seed(generator)))
    return drawn


def inner_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on hard labels; on learned label logits, DATM's soft cross-entropy against
    softmax(logits)."""
    if targets.is_floating_point():
        return -(torch.softmax(targets, dim=1) * torch.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, targets)


def heavy_ball(velocity: torch.Tensor | None, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """b_i = mu * b_{i-1} + g_i, with b_0 = g_0 (``velocity`` None): PyTorch's SGD momentum without
    dampening, as AST's student steps; ``grad`` itself when mu = 0."""
    return grad if velocity is None or momentum == 0 else momentum * velocity + grad


def trajectory_loss(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, matched_from: int = 0
) -> torch.Tensor:
    """MTT's normalised distance: the expert segment's own length is the unit."""
    student, start, target = student[matched_from:], start[matched_from:], target[matched_from:]
    return (student - target).pow(2).sum() / (start - target).pow(2).sum()


def intermediate_points(syn_steps: int, expert_epochs: int) -> list[tuple[int, int]]:
    """AST's waypoints as (student steps, expert epochs after the start): after ``(N // M) * k``
    steps the student is matched to the expert's epoch ``t + k``, for k = 1 .. M - 1 (none when
    N < M: AST's loop never reaches a waypoint at step 0)."""
    per_epoch = syn_steps // expert_epochs
    return [(per_epoch * k, k) for k in range(1, expert_epochs)] if per_epoch > 0 else []


def balanced_scale(start_epoch: int, max_start_epoch: int) -> float:
    """AST's balanced inner loss: the factor on the inner cross-entropy for a segment starting at
    ``start_epoch``: log_5(t - T/2 + 8) from the middle of the window on, 1 / log_5(T/2 - t + 8)
    before it (T/2 = ``max_start_epoch // 2``), so early, steep segments take shorter steps."""
    middle = max_start_epoch // 2
    if start_epoch >= middle:
        return math.log(start_epoch - middle + 8, 5)
    return 1 / math.log(middle - start_epoch + 8, 5)


def perturbed_start(
    net: FlatParams, start: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """AST's weight perturbation of a start point: every 4-D (convolution) weight w becomes
    ``w + strength * d * w`` (elementwise), d a standard Gaussian draw (from ``generator``, on the CPU)
    scaled to unit Frobenius norm over that tensor; the other parameters are kept."""
    chunks = []
    for chunk, shape in zip(torch.split(start, net.sizes), net.shapes, strict=True):
        if len(shape) == 4:
            noise = torch.randn(chunk.shape, generator=generator, dtype=chunk.dtype)
            chunk = chunk + strength * upload(noise / noise.norm(), chunk.device) * chunk
        chunks.append(chunk)
    return torch.cat(chunks)


def shallow_cut(net: FlatParams, fraction: float) -> int:
    """The first flat index PAD matches: the parameters are in network order (shallow first), and the
    leading ``fraction`` of their count is left out, rounded down to whole parameter tensors."""
    limit, first = fraction * net.numel, 0
    for size in net.sizes:
        if first + size > limit:
            break
        first += size
    return first


MASK_STREAM = 0x4D4454
"""Mixed with a step's seed into its MDT mask's seed, so the mask's draws are not the DSA's."""


def masked_inputs(x: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Masked distillation training (MDT, Zhu et al., "Rethinking Data Distillation: Do Not Overlook
    Calibration", ICCV 2023), as we read it (the paper's code is not public): the synthetic batch a
    student steps on, already augmented, times a fresh Bernoulli mask that zeroes each input value
    with probability ``ratio`` (masked temperature scaling's mask, ``x * (u >= t)`` with u uniform, no
    rescaling), so that the images cannot put the class evidence in a few pixels. The gradient reaches
    the kept values only. The mask comes from a CPU generator seeded by ``seed`` (mixed with
    :data:`MASK_STREAM`) alone: the same on every device, on resume, and in both memory modes' walks,
    which recompute a step's batch. ``ratio`` 0 returns ``x`` itself and draws nothing."""
    if ratio == 0:
        return x
    generator = torch.Generator().manual_seed(derived_seed(seed, MASK_STREAM))
    keep = torch.rand(x.shape, generator=generator) >= ratio
    return x * upload(keep, x.device).to(x.dtype)


def _step_gradient(
    segment: Segment,
    theta: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    step: Step,
    create_graph: bool,
) -> torch.Tensor:
    indices = upload(step.indices, images.device)
    x = masked_inputs(dsa(images[indices], segment.augment, step.seed), segment.mask_ratio, step.seed)
    loss = inner_loss(segment.net(theta, x), targets[indices])
    if segment.loss_scale != 1:
        loss = loss * segment.loss_scale
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return grad


def _plain_step(
    segment: Segment,
    theta: torch.Tensor,
    velocity: torch.Tensor | None,
    images: torch.Tensor,
    targets: torch.Tensor,
    step: Step,
    lr: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta - lr * b, b) with b the step's velocity, no graph kept."""
    theta = theta.detach().requires_grad_(True)
    grad = _step_gradient(segment, theta, images.detach(), targets.detach(), step, create_graph=False)
    velocity = heavy_ball(velocity, grad, segment.momentum)
    return (theta - lr * velocity).detach(), velocity


def _waypoint_loss(segment: Segment, theta: torch.Tensor, waypoint: Waypoint) -> torch.Tensor:
    return trajectory_loss(theta, segment.start, waypoint.target, segment.matched_from)


def unrolled_loss(
    segment: Segment, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """The matching loss with the graph of every step kept (call ``backward`` on it)."""
    waypoints = {w.steps: w for w in segment.waypoints}
    intermediate = []
    theta = segment.start.clone().requires_grad_(True)
    velocity = None
    for i, step in enumerate(segment.steps):
        grad = _step_gradient(segment, theta, images, targets, step, create_graph=True)
        velocity = heavy_ball(velocity, grad, segment.momentum)
        theta = theta - lr * velocity
        if i + 1 in waypoints:
            intermediate.append(_waypoint_loss(segment, theta, waypoints[i + 1]))
    loss = trajectory_loss(theta, segment.start, segment.target, segment.matched_from)
    for part in intermediate:
        loss = loss + part
    return loss


def constant_memory_backward(
    segment: Segment, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """The adjoint walk of the module docstring: accumulates dL/d(images), dL/d(targets) when they
    require grad, and dL/d(lr) into their ``.grad``, like ``unrolled_loss(...).backward()``; returns
    the loss (detached)."""
    a = lr.detach()  # a device scalar: reading it as a float would wait for the device
    n = len(segment.steps)
    every = max(1, math.ceil(math.sqrt(n)))
    waypoints = {w.steps: w for w in segment.waypoints}
    checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    pulls: dict[int, torch.Tensor] = {}  # dL_k/dtheta_{m_k} of each intermediate loss
    intermediate = []
    theta, velocity = segment.start.detach(), None
    for i, step in enumerate(segment.steps):
        if i % every == 0:
            checkpoints[i] = theta, velocity
        theta, velocity = _plain_step(segment, theta, velocity, images, targets, step, a)
        if i + 1 in waypoints:
            at = theta.detach().requires_grad_(True)
            part = _waypoint_loss(segment, at, waypoints[i + 1])
            (pulls[i + 1],) = torch.autograd.grad(part, at)
            intermediate.append(part.detach())
    end = theta.requires_grad_(True)
    loss = trajectory_loss(end, segment.start, segment.target, segment.matched_from)
    (adjoint,) = torch.autograd.grad(loss, end)
    leaves = [t for t in (images, targets) if t.requires_grad]
    grads = [torch.zeros_like(t) for t in leaves]
    lr_grad = torch.zeros((), dtype=adjoint.dtype, device=adjoint.device)
    carried = None  # k_{i+1}: the velocity's adjoint over -a
    for first in reversed(range(0, n, every)):
        last = min(first + every, n)
        states = [checkpoints[first]]  # (theta_i, b_{i-1}), recomputed from the segment's checkpoint
        for i in range(first, last - 1):
            states.append(_plain_step(segment, *states[-1], images, targets, segment.steps[i], a))
        for i in reversed(range(first, last)):
            theta_i = states[i - first][0].detach().requires_grad_(True)
            grad = _step_gradient(segment, theta_i, images, targets, segment.steps[i], create_graph=True)
            velocity = heavy_ball(states[i - first][1], grad.detach(), segment.momentum)
            lr_grad -= (adjoint * velocity).sum()
            carried = heavy_ball(carried, adjoint, segment.momentum)
            pulled = torch.autograd.grad(-a * (carried * grad).sum(), [theta_i, *leaves])
            adjoint = adjoint + pulled[0]
            if i in pulls:
                adjoint = adjoint + pulls[i]
            for total, part in zip(grads, pulled[1:], strict=True):
                total += part
    for leaf, grad in zip([*leaves, lr], [*grads, lr_grad.reshape(lr.shape)], strict=True):
        leaf.grad = grad if leaf.grad is None else leaf.grad + grad
    for part in intermediate:
        loss = loss + part
    return loss.detach()


def matched_gradient(
    segment: Segment, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor, memory: Memory
) -> torch.Tensor:
    """Accumulate the matching loss's gradient into images/targets/lr ``.grad``; return the loss."""
    if memory == "constant":
        return constant_memory_backward(segment, images, targets, lr)
    loss = unrolled_loss(segment, images, targets, lr)
    loss.backward()  # a non-finite loss is the caller's to refuse, before any step (no read here)
    return loss.detach()


def start_window(
    iteration: int, lowest: int, highest: int, initial_highest: int | None, growth_iterations: int
) -> tuple[int, int]:
    """DATM's start-epoch window [lowest, upper] at ``iteration``: ``upper`` grows linearly from
    ``initial_highest`` to ``highest`` over ``growth_iterations`` iterations (easy segments first),
    or is ``highest`` throughout when ``initial_highest`` is None (MTT). Both ends inclusive."""
    if initial_highest is None:
        return lowest, highest
    grown = initial_highest + int((highest - initial_highest) * iteration / growth_iterations)
    return lowest, min(grown, highest)
