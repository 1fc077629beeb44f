"""The inner loop of the BPTT line of dataset distillation, shared by DD (:mod:`condense.methods.dd`),
RaT-BPTT (:mod:`condense.methods.ratbptt`) and AT-BPTT (:mod:`condense.methods.atbptt`).

A network starts at theta_0 and is trained on synthetic batches by an update rule U whose state s
holds the parameters and whatever the rule carries (Adam's moments; nothing more for plain GD):

    g_i     = grad_theta loss(f(theta_i; A_i(x[B_i])), y[B_i])
    s_{i+1} = U_i(s_i, g_i)                                      i = 0 .. start + W - 1
    L       = CE(f(theta_{start+W}; x_real), y_real)

(B_i: the i-th batch of synthetic images, A_i: its augmentation, y: hard labels or learned label
logits, x_real: an augmented real batch). The gradient of L with respect to the pixels x, the learned
labels and U's learned hyperparameters (DD's step sizes) is taken through the W steps of the
*window* only: the ``start`` steps before it run without a graph, so s_start is a constant (the
truncation of RaT-BPTT; DD has start 0 and a window of every step). Two ways, with the same result:

- ``unrolled``: the window's steps keep their graphs (each gradient g_i with ``create_graph``) and
  one backward pass runs through all of them. Memory grows linearly with W.
- ``constant``: the window runs forward without graphs, keeping its states every ceil(sqrt(W)) steps;
  then it is walked backwards with the adjoint lambda_i = dL/ds_i, one step at a time::

      lambda_W = dL/ds_W
      (lambda_i, dL/dx, dL/dy, dL/dh) += vjp of s_i -> U_i(s_i, g_i(s_i, x, y; h)) at lambda_{i+1}

  Each step's vector-Jacobian product is one double backward of that step alone (its states are
  recomputed segment by segment from the checkpoints), so activation memory does not depend on W and
  state memory is O(sqrt(W)) states. It is :mod:`condense.methods.trajectory`'s exact walk written
  for any update rule: Adam's moments are part of s, so their dependence on the pixels is kept.

Nothing here reads the real data: callers draw their batches (by index, so streamed data works).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from condense.augment import dsa
from condense.config import DSAConfig
from condense.devices import upload
from condense.methods.trajectory import Step, inner_loss, masked_inputs
from condense.models import FlatParams
from condense.training import random_seed

Memory = Literal["unrolled", "constant"]
SHARED_NETWORK = "each iteration trains one network on synthetic batches of every class"
"""Why the BPTT methods do not shard (``compute.shards``)."""
State = tuple[torch.Tensor, ...]
"""An update rule's state: the flat parameters first, then what the rule carries."""


class UpdateRule(Protocol):
    """How the inner network steps: ``step(state, grad, i)`` is differentiable in all of its inputs
    and in :meth:`learned`."""

    def initial(self, theta: torch.Tensor) -> State: ...

    def step(self, state: State, grad: torch.Tensor, i: int) -> State: ...

    def learned(self) -> list[torch.Tensor]:
        """Hyperparameters that receive gradients (empty when nothing of the rule is learned)."""
        ...


@dataclass(frozen=True)
class LearnedStepGD:
    """DD's plain gradient descent with one learned step size per step: theta - softplus(r_i) * g_i."""

    raw_lrs: torch.Tensor
    """(T,) step sizes before the softplus, one per step."""

    def initial(self, theta: torch.Tensor) -> State:
        return (theta,)

    def step(self, state: State, grad: torch.Tensor, i: int) -> State:
        return (state[0] - F.softplus(self.raw_lrs[i]) * grad,)

    def learned(self) -> list[torch.Tensor]:
        return [self.raw_lrs] if self.raw_lrs.requires_grad else []


def raw_step_size(lr: float) -> float:
    """The softplus's inverse: the raw value whose softplus is ``lr``."""
    return math.log(math.expm1(lr))


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero gradient where ``x`` is 0 (an unused weight's second moment) instead of
    sqrt's infinite one, which times a zero upstream gradient is NaN (higher masks it the same way)."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


@dataclass(frozen=True)
class Adam:
    """torch.optim.Adam's update without weight decay, written out so it can be differentiated
    (as higher's DifferentiableAdam that RaT-BPTT's code steps with); step ``i`` is Adam's step i + 1."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def initial(self, theta: torch.Tensor) -> State:
        return theta, torch.zeros_like(theta), torch.zeros_like(theta)

    def step(self, state: State, grad: torch.Tensor, i: int) -> State:
        theta, m, v = state
        beta1, beta2 = self.betas
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        denom = _sqrt(v) / math.sqrt(1 - beta2 ** (i + 1)) + self.eps
        return theta - (self.lr / (1 - beta1 ** (i + 1))) * m / denom, m, v

    def learned(self) -> list[torch.Tensor]:
        return []


@dataclass(frozen=True)
class Inner:
    """One inner run: the network, where it starts, its steps' batches and how it steps."""

    net: FlatParams
    init: torch.Tensor
    """theta_0, flat."""
    steps: list[Step]
    rule: UpdateRule
    augment: DSAConfig | None = None
    """DSA on every synthetic batch (each step's own seed); None: none."""
    mask_ratio: float = 0.0
    """MDT: after the augmentation, each batch's input values are zeroed with this probability by a
    mask seeded from the step's seed (:func:`condense.methods.trajectory.masked_inputs`); 0: none.
    Only for steps whose seeds are drawn fresh (RaT-BPTT's): DD's steps all carry seed 0."""


@dataclass(frozen=True)
class Outcome:
    """What the outer loss reports: the loss and the trained network's accuracy (%) on the real batch,
    device scalars (reading them is the caller's one wait)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


@dataclass(frozen=True)
class Probe:
    """The inner run without graphs: where it ended and each step's gradient norm (device scalars)."""

    state: State
    grad_norms: list[torch.Tensor] = field(default_factory=list)


def _gradient(
    inner: Inner,
    theta: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    step: Step,
    create_graph: bool,
) -> torch.Tensor:
    indices = upload(step.indices, images.device)
    x = images[indices]
    if inner.augment is not None:
        x = dsa(x, inner.augment, step.seed)
    x = masked_inputs(x, inner.mask_ratio, step.seed)
    loss = inner_loss(inner.net(theta, x), targets[indices])
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return grad


def _advance(
    inner: Inner, state: State, images: torch.Tensor, targets: torch.Tensor, i: int, create_graph: bool
) -> tuple[State, torch.Tensor]:
    """Step ``i`` from ``state`` (whose parameters must require grad): (next state, the step's gradient)."""
    grad = _gradient(inner, state[0], images, targets, inner.steps[i], create_graph)
    return inner.rule.step(state, grad, i), grad


def _plain_step(
    inner: Inner, state: State, images: torch.Tensor, targets: torch.Tensor, i: int
) -> tuple[State, torch.Tensor]:
    """Step ``i`` with no graph kept: (next state, detached), and the step's gradient."""
    theta = state[0].detach().requires_grad_(True)
    grad = _gradient(inner, theta, images.detach(), targets.detach(), inner.steps[i], create_graph=False)
    with torch.no_grad():
        return inner.rule.step((theta.detach(), *state[1:]), grad, i), grad


def train_plain(
    inner: Inner, images: torch.Tensor, targets: torch.Tensor, steps: int, norms: bool = False
) -> Probe:
    """The first ``steps`` steps from theta_0 without graphs (the steps before a window, or AT-BPTT's
    probe); with ``norms``, each step's gradient norm too."""
    state = inner.rule.initial(inner.init.detach())
    grad_norms = []
    for i in range(steps):
        state, grad = _plain_step(inner, state, images, targets, i)
        if norms:
            grad_norms.append(grad.norm())
    return Probe(state, grad_norms)


def outer_loss(net: FlatParams, theta: torch.Tensor, real: torch.Tensor, labels: torch.Tensor) -> Outcome:
    """Cross-entropy of the network at ``theta`` on the real batch, and its accuracy there."""
    logits = net(theta, real)
    accuracy = (logits.detach().argmax(1) == labels).to(logits.dtype).mean() * 100
    return Outcome(F.cross_entropy(logits, labels), accuracy)


def _leaves(images: torch.Tensor, targets: torch.Tensor, inner: Inner) -> list[torch.Tensor]:
    return [t for t in (images, targets) if t.requires_grad] + inner.rule.learned()


def _accumulate(leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for leaf, grad in zip(leaves, grads, strict=True):
        leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def window_gradient(
    inner: Inner,
    start: int,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    memory: Memory,
) -> Outcome:
    """Accumulate dL/d(images), dL/d(targets) when they require grad and dL/d(the rule's learned
    hyperparameters) into their ``.grad``, through the window ``start .. len(inner.steps) - 1``
    (the module docstring); returns L and the accuracy on the real batch, detached."""
    before = train_plain(inner, images, targets, start).state
    if memory == "constant":
        return _constant_memory_backward(inner, start, before, real, real_labels, images, targets)
    state = (before[0].requires_grad_(True), *before[1:])
    for i in range(start, len(inner.steps)):
        state, _ = _advance(inner, state, images, targets, i, create_graph=True)
    outcome = outer_loss(inner.net, state[0], real, real_labels)
    leaves = _leaves(images, targets, inner)
    # autograd.grad, not backward: theta_start is a leaf too, and nothing should land in its .grad.
    _accumulate(leaves, torch.autograd.grad(outcome.loss, leaves))
    return Outcome(outcome.loss.detach(), outcome.accuracy)


def _constant_memory_backward(
    inner: Inner,
    start: int,
    before: State,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
) -> Outcome:
    steps = len(inner.steps) - start
    every = max(1, math.ceil(math.sqrt(steps)))
    checkpoints: dict[int, State] = {}
    state = before
    for k in range(steps):
        if k % every == 0:
            checkpoints[k] = state
        state, _ = _plain_step(inner, state, images, targets, start + k)
    end = state[0].requires_grad_(True)
    outcome = outer_loss(inner.net, end, real, real_labels)
    (theta_adjoint,) = torch.autograd.grad(outcome.loss, end)
    adjoint: State = (theta_adjoint, *(torch.zeros_like(t) for t in state[1:]))
    leaves = _leaves(images, targets, inner)
    totals = [torch.zeros_like(leaf) for leaf in leaves]
    for first in reversed(range(0, steps, every)):
        last = min(first + every, steps)
        states = [checkpoints[first]]
        for k in range(first, last - 1):  # recompute this segment's states from its checkpoint
            states.append(_plain_step(inner, states[-1], images, targets, start + k)[0])
        for k in reversed(range(first, last)):
            here = tuple(t.detach().requires_grad_(True) for t in states[k - first])
            after, _ = _advance(inner, here, images, targets, start + k, create_graph=True)
            pulled = torch.autograd.grad(after, [*here, *leaves], adjoint, allow_unused=True)
            adjoint = tuple(_or_zeros(p, t) for p, t in zip(pulled[: len(here)], here, strict=True))
            for total, part in zip(totals, pulled[len(here) :], strict=True):
                if part is not None:
                    total += part
    _accumulate(leaves, totals)
    return Outcome(outcome.loss.detach(), outcome.accuracy)


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def class_balanced_steps(
    num_classes: int,
    ipc: int,
    per_class: int,
    classes_per_step: int,
    count: int,
    generator: torch.Generator,
) -> list[Step]:
    """RaT-BPTT's batches over a class-major synthetic set: each step takes ``classes_per_step``
    classes drawn at random (all of them when it is ``num_classes``) and ``per_class`` random images
    of each (in index order), then its augmentation seed."""
    steps = []
    for _ in range(count):
        classes = torch.arange(num_classes)
        if classes_per_step < num_classes:
            classes = torch.randperm(num_classes, generator=generator)[:classes_per_step].sort().values
        picks = [
            torch.randperm(ipc, generator=generator)[:per_class].sort().values + ipc * c for c in classes
        ]
        steps.append(Step(torch.cat(picks), random_seed(generator)))
    return steps


def real_batch(num_train: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a random batch of ``size`` training images (all of them when there are fewer),
    drawn without replacement."""
    return torch.randperm(num_train, generator=generator)[: min(size, num_train)]


def draw_generator(seed: int, draw: int) -> torch.Generator:
    """A generator that depends only on (run seed, draw number): a window placed from it is where the
    seed says, whatever happened before (resume, other draws)."""
    (mixed,) = np.random.SeedSequence([seed, draw]).generate_state(1)
    return torch.Generator().manual_seed(int(mixed))


def unit_norm_noise(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Gaussian images projected to unit L2 norm each: RaT-BPTT's unbiased start (``project``)."""
    noise = torch.randn(*shape, generator=generator)
    return noise / noise.flatten(1).norm(dim=1).view(-1, *[1] * (len(shape) - 1))
