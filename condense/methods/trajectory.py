"""Trajectory matching's inner problem, shared by MTT and its successors (FTD, DATM, PAD).

A segment starts a student at an expert's parameters theta*_t and takes N SGD steps on synthetic
batches with the learnable step size a:

    theta_0 = theta*_t,   theta_{i+1} = theta_i - a * g_i,
    g_i = grad_theta loss(f(theta_i; A_i(x[B_i])), y[B_i])

(B_i: the i-th batch of synthetic images, A_i: its DSA transform, y: hard labels or DATM's learned
label logits). The matching loss is MTT's normalised distance to the expert's later point,

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2,

taken over the parameters from ``matched_from`` on (PAD leaves the shallowest out). Its gradient with
respect to the pixels, the labels and a is computed one of two ways, with the same result:

- ``unrolled`` (MTT): every step keeps its graph and one backward pass runs through all of them.
  Memory grows linearly with N (each step keeps its activations and its gradient's graph).
- ``constant`` (TESLA, Cui et al. ICML 2023): the N steps run forward without graphs; then the steps
  are walked backwards with the adjoint lambda_i = dL/dtheta_i (reverse mode written out)::

      lambda_N  = dL/dtheta_N
      dL/dx    += -a * lambda_{i+1} . dg_i/dx        (and dL/dy the same way, for learned labels)
      dL/da    += -lambda_{i+1} . g_i
      lambda_i  = lambda_{i+1} - a * H_i lambda_{i+1}

  The three terms of step i come from one double backward of ``lambda_{i+1} . g_i`` at theta_i, so
  one step's graph is alive at a time: activation memory does not depend on N.

  Deviation from TESLA's official code, stated: it treats every lambda_i as lambda_N, dropping the
  H_i terms (how batch i moves the parameters later batches see). This walk keeps them, so it is
  exact: it equals the unrolled gradient up to floating-point rounding (tests/test_trajectory.py). The
  cost is the same double backward per step TESLA pays (the Hessian-vector product rides along) plus
  one recomputed forward step: theta_i are checkpointed every ceil(sqrt(N)) steps and recomputed
  segment by segment in the backward walk, so parameter memory is O(sqrt(N) * P), not TESLA's N * P.
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
from condense.training import random_seed

Memory = Literal["unrolled", "constant"]


@dataclass(frozen=True)
class Step:
    """One inner step's draws: which synthetic images, and the seed of their DSA transform."""

    indices: torch.Tensor
    seed: int


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


def trajectory_loss(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, matched_from: int = 0
) -> torch.Tensor:
    """MTT's normalised distance: the expert segment's own length is the unit."""
    student, start, target = student[matched_from:], start[matched_from:], target[matched_from:]
    return (student - target).pow(2).sum() / (start - target).pow(2).sum()


def shallow_cut(net: FlatParams, fraction: float) -> int:
    """The first flat index PAD matches: the parameters are in network order (shallow first), and the
    leading ``fraction`` of their count is left out, rounded down to whole parameter tensors."""
    limit, first = fraction * net.numel, 0
    for size in net.sizes:
        if first + size > limit:
            break
        first += size
    return first


def _step_gradient(
    segment: Segment,
    theta: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    step: Step,
    create_graph: bool,
) -> torch.Tensor:
    indices = upload(step.indices, images.device)
    x = dsa(images[indices], segment.augment, step.seed)
    loss = inner_loss(segment.net(theta, x), targets[indices])
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return grad


def _plain_step(
    segment: Segment,
    theta: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    step: Step,
    lr: torch.Tensor,
) -> torch.Tensor:
    """theta - lr * g, with no graph kept."""
    theta = theta.detach().requires_grad_(True)
    grad = _step_gradient(segment, theta, images.detach(), targets.detach(), step, create_graph=False)
    return (theta - lr * grad).detach()


def unrolled_loss(
    segment: Segment, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """The matching loss with the graph of every step kept (call ``backward`` on it)."""
    theta = segment.start.clone().requires_grad_(True)
    for step in segment.steps:
        theta = theta - lr * _step_gradient(segment, theta, images, targets, step, create_graph=True)
    return trajectory_loss(theta, segment.start, segment.target, segment.matched_from)


def constant_memory_backward(
    segment: Segment, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """The adjoint walk of the module docstring: accumulates dL/d(images), dL/d(targets) when they
    require grad, and dL/d(lr) into their ``.grad``, like ``unrolled_loss(...).backward()``; returns
    the loss (detached)."""
    a = lr.detach()  # a device scalar: reading it as a float would wait for the device
    n = len(segment.steps)
    every = max(1, math.ceil(math.sqrt(n)))
    checkpoints = {}
    theta = segment.start.detach()
    for i, step in enumerate(segment.steps):
        if i % every == 0:
            checkpoints[i] = theta
        theta = _plain_step(segment, theta, images, targets, step, a)
    end = theta.requires_grad_(True)
    loss = trajectory_loss(end, segment.start, segment.target, segment.matched_from)
    (adjoint,) = torch.autograd.grad(loss, end)
    leaves = [t for t in (images, targets) if t.requires_grad]
    grads = [torch.zeros_like(t) for t in leaves]
    lr_grad = torch.zeros((), dtype=adjoint.dtype, device=adjoint.device)
    for first in reversed(range(0, n, every)):
        last = min(first + every, n)
        thetas = [checkpoints[first]]
        for i in range(first, last - 1):  # recompute this segment's parameters from its checkpoint
            thetas.append(_plain_step(segment, thetas[-1], images, targets, segment.steps[i], a))
        for i in reversed(range(first, last)):
            theta_i = thetas[i - first].detach().requires_grad_(True)
            grad = _step_gradient(segment, theta_i, images, targets, segment.steps[i], create_graph=True)
            lr_grad -= (adjoint * grad.detach()).sum()
            pulled = torch.autograd.grad(-a * (adjoint * grad).sum(), [theta_i, *leaves])
            adjoint = adjoint + pulled[0]
            for total, part in zip(grads, pulled[1:], strict=True):
                total += part
    for leaf, grad in zip([*leaves, lr], [*grads, lr_grad.reshape(lr.shape)], strict=True):
        leaf.grad = grad if leaf.grad is None else leaf.grad + grad
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
