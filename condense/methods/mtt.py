"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022).

Each outer iteration:

1. draw an expert and a start epoch ``t <= max_start_epoch``;
2. start a student at the expert's parameters theta*_t;
3. take ``syn_steps`` differentiable SGD steps on DSA-augmented synthetic batches, with the learnable
   step size alpha: theta_{i+1} = theta_i - alpha * grad CE(theta_i; syn batch);
4. loss = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2, with M = ``expert_epochs``;
5. backpropagate through the whole unroll into the pixels and alpha (SGD, momentum 0.5 on both).

Deviation from the reference code, on purpose: alpha is clamped to ``min_lr`` > 0 after each step
(the official code lets it go negative or explode, MTT issues #6/#16/#20), and a non-finite loss
stops the run with the last good checkpoint kept instead of writing NaN images.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from condense.artifacts import ExpertBuffer
from condense.augment import dsa
from condense.config import Strict
from condense.errors import DivergenceError
from condense.experts import student_model
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, Resumable, SyntheticSet
from condense.methods.initial import initial_images
from condense.models import ConvNet, FlatParams
from condense.training import random_seed


class MTTConfig(Strict):
    iterations: int = Field(default=200, gt=0)
    syn_steps: int = Field(default=20, gt=0)
    """N: unrolled student steps per iteration (memory grows linearly in it)."""
    expert_epochs: int = Field(default=2, gt=0)
    """M: how many expert epochs the N student steps must cover."""
    max_start_epoch: int = Field(default=5, ge=0)
    """Start epochs are drawn uniformly from 0..max_start_epoch."""
    lr_img: float = Field(default=100.0, gt=0)
    lr_lr: float = Field(default=1e-5, gt=0)
    lr_init: float = Field(default=0.01, gt=0)
    """Initial learnable step size alpha (the paper's lr_teacher)."""
    min_lr: float = Field(default=1e-5, gt=0)
    momentum: float = Field(default=0.5, ge=0)
    batch_syn: int | None = Field(default=None, gt=0)
    """Synthetic images per student step; None = the whole set (the paper's default)."""
    init: Literal["real", "noise", "kmeans"] = "real"
    """Random real images, noise, or the real images nearest k-means centroids of an expert's features."""
    checkpoint_every: int = Field(default=50, gt=0)


def check(cfg: Any) -> None:
    """Cross-field checks against the pipeline config (expert length)."""
    needed = cfg.distill.max_start_epoch + cfg.distill.expert_epochs
    if needed > cfg.experts.epochs:
        raise ValueError(
            f"distill.max_start_epoch + distill.expert_epochs = {needed} needs experts.epochs >= {needed}"
            f" (got {cfg.experts.epochs})"
        )


def trajectory_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MTT's normalised distance: the expert segment's own length is the unit."""
    return (student - target).pow(2).sum() / (start - target).pow(2).sum()


def unroll(
    net: FlatParams,
    start: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    steps: int,
    batch: int,
    generator: torch.Generator,
    augment: Any,
) -> torch.Tensor:
    """``steps`` differentiable SGD steps from ``start`` on synthetic batches; returns the endpoint."""
    theta = start.clone().requires_grad_(True)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) == 0:
            order = torch.randperm(len(images), generator=generator)
        idx, order = order[:batch], order[batch:]
        x = dsa(images[idx], augment, random_seed(generator))
        ce = F.cross_entropy(net(theta, x), labels[idx])
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - lr * grad
    return theta


@register_method("mtt", config=MTTConfig, needs=("experts",), check=check)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    cfg: MTTConfig = inputs.method_cfg
    buffer: ExpertBuffer = inputs.experts
    data = inputs.data
    generator = torch.Generator().manual_seed(inputs.seed)

    def trained_expert(seed: int) -> ConvNet:
        # k-means needs meaningful features: embed with an expert's final weights, not a random net.
        net = FlatParams(student_model(data, inputs.model_cfg, seed))
        return net.load_into(buffer.snapshot(0, buffer.num_snapshots - 1))

    images = initial_images(data, inputs.ipc, cfg.init, generator, trained_expert)
    device = images.device
    labels = torch.arange(data.num_classes, device=device).repeat_interleave(inputs.ipc)
    images.requires_grad_(True)
    syn_lr = torch.tensor(cfg.lr_init, device=device, requires_grad=True)
    opt_img = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum)
    opt_lr = torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
    resumable = Resumable(
        {"images": images, "syn_lr": syn_lr}, {"opt_img": opt_img, "opt_lr": opt_lr}, generator
    )
    history: list[dict[str, float]] = []
    start_it = 0
    state = checkpoints.load()
    if state is not None:
        start_it, history = resumable.restore(state)
        progress.note(f"resuming MTT from checkpoint at iteration {start_it}/{cfg.iterations}")

    net = FlatParams(student_model(data, inputs.model_cfg, inputs.seed))
    batch = cfg.batch_syn or len(images)
    for it in range(start_it, cfg.iterations):
        expert = int(torch.randint(buffer.num_experts, (1,), generator=generator))
        t = int(torch.randint(cfg.max_start_epoch + 1, (1,), generator=generator))
        start = buffer.snapshot(expert, t).to(device)
        target = buffer.snapshot(expert, t + cfg.expert_epochs).to(device)
        student = unroll(net, start, images, labels, syn_lr, cfg.syn_steps, batch, generator, inputs.dsa_cfg)
        loss = trajectory_loss(student, start, target)
        if not torch.isfinite(loss):
            last = checkpoints.load()
            kept = f"iteration {last['iteration']}" if last else "none yet"
            raise DivergenceError(
                f"MTT diverged at iteration {it + 1} (loss={loss.item()}); last good checkpoint: {kept};"
                " lower distill.lr_img or distill.lr_lr"
            )
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        opt_lr.step()
        with torch.no_grad():
            syn_lr.clamp_(min=cfg.min_lr)
        history.append({"iteration": it + 1, "loss": loss.item(), "lr": syn_lr.item()})
        progress.step(it + 1, cfg.iterations, f"loss {loss.item():.4f} lr {syn_lr.item():.4g}")
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            checkpoints.save(resumable.snapshot(it + 1, history))

    return SyntheticSet(images=images.detach().clone(), labels=labels, lr=syn_lr.item(), history=history)
