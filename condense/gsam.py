"""GSAM (Zhuang et al., ICLR 2022) as FTD trains its experts (Du et al., CVPR 2023, buffer_FTD.py):
sharpness-aware steps that keep the expert trajectories flat.

One step on a batch, all parameters taken jointly as one vector ``w`` (the official code sums the
inner product and the norms over every parameter tensor)::

    g      = grad L(w)                                          the caller's backward on the batch
    e      = rho * g / (||g|| + eps)                           adaptive: rho * w^2 g / (|| |w| g || + eps)
    g_adv  = grad L(w + e)                                      the same batch again (same DSA draw)
    cos    = <g, g_adv> / (||g|| ||g_adv|| + eps)
    g_perp = g - cos * ||g|| * g_adv / (||g_adv|| + eps)       g minus its projection on g_adv
    w      <- base optimizer step with gradient  g_adv - alpha * g_perp

(``gradient_decompose`` of the official ``gsam.py``, eps = 1e-12; the training loop reports the
loss at ``w``, as the official code does.) Batch-norm running statistics are not updated by the
second pass (the official code sets their momentum to 0 for it).

Deviations: ``rho`` is a constant (FTD's ``ProportionScheduler`` with ``max_lr == min_lr`` is one);
the weights are restored from a copy rather than by subtracting ``e`` (the same up to rounding); no
gradient all-reduce across processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Closure = Callable[[], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

EPS = 1e-12


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` as one vector (a tensor: no host synchronisation)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def perturbation(
    params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, adaptive: bool, eps: float = EPS
) -> list[torch.Tensor]:
    """``e``: the ascent step of length ``rho`` along ``g`` (adaptive: ASAM's ``w^2 g`` scaled by
    ``|| |w| g ||``, as the official ``perturb_weights``)."""
    if adaptive:
        scale = rho / (_norm([p.abs() * g for p, g in zip(params, grads, strict=True)]) + eps)
        return [g * scale * p.pow(2) for p, g in zip(params, grads, strict=True)]
    scale = rho / (_norm(grads) + eps)
    return [g * scale for g in grads]


def decompose(
    grads: list[torch.Tensor], adv_grads: list[torch.Tensor], alpha: float, eps: float = EPS
) -> list[torch.Tensor]:
    """``g_adv - alpha * g_perp``: the official ``gradient_decompose``, jointly over all parameters."""
    inner = sum(torch.sum(g * a) for g, a in zip(grads, adv_grads, strict=True))
    norm, adv_norm = _norm(grads), _norm(adv_grads)
    cosine = inner / (adv_norm * norm + eps)
    return [
        a - alpha * (g - cosine * norm * a / (adv_norm + eps)) for g, a in zip(grads, adv_grads, strict=True)
    ]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm still normalises by the batch, but its running statistics stay put (momentum 0)."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    for module, _ in saved:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum


class GSAM(torch.optim.Optimizer):
    """GSAM around ``base`` (its parameters, learning rate, momentum and weight decay).

    Used like any optimizer after ``loss.backward()``: ``step`` takes the gradient there as ``g``,
    then calls ``closure`` (given here or to ``step``) at the perturbed weights: it must evaluate the
    loss on the same batch and backpropagate it (see :class:`BatchReplay`).
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float,
        alpha: float,
        adaptive: bool = False,
        closure: Closure | None = None,
        eps: float = EPS,
    ):
        if rho < 0 or alpha < 0:
            raise ValueError(f"GSAM needs rho >= 0 and alpha >= 0, got rho={rho}, alpha={alpha}")
        super().__init__([p for group in base.param_groups for p in group["params"]], {})
        self.param_groups = base.param_groups  # one set of groups: the base's learning rate rules
        self.base = base
        self.rho, self.alpha, self.adaptive, self.eps = rho, alpha, adaptive, eps
        self.closure = closure

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One GSAM step; returns the loss at the perturbed weights (the closure's)."""
        closure = closure or self.closure
        if closure is None:
            raise ValueError("GSAM.step needs a closure that evaluates the same batch again")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]  # type: ignore[misc]
        origin = [p.detach().clone() for p in params]
        e = perturbation(params, grads, self.rho, self.adaptive, self.eps)
        torch._foreach_add_(params, e)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            adv_loss = closure()
        adv_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        direction = decompose(grads, adv_grads, self.alpha, self.eps)
        for p, w, d in zip(params, origin, direction, strict=True):
            p.copy_(w)
            p.grad = d
        self.base.step()
        return adv_loss


class BatchReplay:
    """Remembers the batch a training loop last evaluated, so that GSAM evaluates the same (already
    augmented) batch at the perturbed weights: give the loop :meth:`forward` and :meth:`loss` in
    place of its own, and GSAM :meth:`closure`."""

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], loss_fn: LossFn):
        self.model, self._forward, self._loss_fn = model, forward, loss_fn
        self._inputs: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self._inputs = inputs
        return self._forward(inputs)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._targets = targets
        return self._loss_fn(logits, targets)

    def closure(self) -> torch.Tensor:
        """The loss on the remembered batch at the current weights, backpropagated."""
        if self._inputs is None or self._targets is None:
            raise RuntimeError("no batch to replay: the loop has not evaluated one yet")
        with frozen_batchnorm_stats(self.model):
            loss = self._loss_fn(self._forward(self._inputs), self._targets)
        loss.backward()
        return loss.detach()
