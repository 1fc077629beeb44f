"""DD: Dataset Distillation (Wang, Zhu, Torralba, Efros 2018; official code SsnL/dataset-distillation,
``train_distilled_image.py``).

The synthetic set is S = ipc / ``images_per_step`` batches of ``images_per_step`` images per class
(batch s holds images s * k .. s * k + k - 1 of every class), applied in order for ``epochs`` passes:
T = S * ``epochs`` gradient-descent steps, step i with its own learned step size
eta_i = softplus(r_i). Each outer iteration (the paper's Algorithm 1, multi-step form):

1. draw a real batch of ``batch_real`` training images;
2. take ``networks`` initial weights theta_0^(j): fresh random ones every iteration
   (``init: unknown``, DD's ``unknown_init``) or the same fixed ones every time (``init: known``);
3. for each, train T steps: theta_{i+1} = theta_i - eta_i * grad_theta CE(f(theta_i; x[B_i]), y[B_i]),
   with B_i = batch (i mod S);
4. L^(j) = CE(f(theta_T^(j); x_real), y_real);
5. the gradient of mean_j L^(j) through all T steps (:mod:`condense.methods.bptt`: the whole unroll
   is the window; ``memory: unrolled``, or the constant-memory walk, DD's own hand-written reverse
   sweep with Hessian-vector products made exact in O(sqrt(T)) parameter copies) updates the pixels
   and the raw step sizes r with Adam (lr ``lr``, betas 0.5 / 0.999), whose learning rate is multiplied
   by ``decay_factor`` every ``decay_every`` iterations (DD's StepLR, counted in iterations here, in
   passes over the real data there).

Deviations from the paper and its code, stated: the network is the project's ConvNet (DD used LeNet
on MNIST, AlexCifarNet on CIFAR-10), trained in its one mode (DD evaluates the outer loss in eval
mode, which only matters for batch norm); real batches are drawn independently each iteration (DD's
loader walks epochs); a non-finite loss stops the run with the last good checkpoint kept.

Evaluation: the set carries its schedule (:class:`condense.synthetic.StepSchedule`: the T steps'
images in order, their learned step sizes and, for ``init: known``, the seeds of the fixed networks),
and ``evaluate.recipe: replay`` is DD's own evaluation: fresh networks (the fixed ones for ``known``)
trained by exactly those T steps. The default evaluation trains the pipeline's fixed recipe on the set
instead, which DD's issue #36 shows costs the order- and step-coupled images much of their accuracy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from condense.config import Strict
from condense.devices import upload
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, Resumable, ResumableLoop, SyntheticSet
from condense.methods.bptt import (
    SHARED_NETWORK,
    Inner,
    LearnedStepGD,
    Memory,
    raw_step_size,
    real_batch,
    window_gradient,
)
from condense.methods.initial import initial_images
from condense.methods.trajectory import Step
from condense.models import CONVNET, FlatParams
from condense.synthetic import StepSchedule
from condense.training import random_seed, student_model


class DDConfig(Strict):
    learns_schedule: ClassVar[bool] = True
    """Its sets carry the step schedule ``evaluate.recipe: replay`` trains by."""

    iterations: int = Field(default=300, gt=0)
    """Outer iterations, one real batch each."""
    images_per_step: int = Field(default=1, gt=0)
    """Images of each class in one step's batch (``distilled_images_per_class_per_step``); ipc must be a
    multiple: ipc / images_per_step batches (``distill_steps``)."""
    epochs: int = Field(default=3, gt=0)
    """Passes over the batches (``distill_epochs``): T = batches * epochs steps, one step size each."""
    lr_init: float = Field(default=0.02, gt=0)
    """Every step size's start (``distill_lr``)."""
    lr: float = Field(default=0.01, gt=0)
    """The outer Adam's learning rate on pixels and step sizes."""
    decay_every: int = Field(default=100, gt=0)
    """Iterations between multiplications of ``lr`` by ``decay_factor``."""
    decay_factor: float = Field(default=0.5, gt=0, le=1)
    batch_real: int = Field(default=1024, gt=0)
    """Real images in the outer loss's batch (``batch_size``)."""
    init: Literal["unknown", "known"] = "unknown"
    """``unknown``: fresh random networks every iteration (``unknown_init``); ``known``: the same fixed
    ones (``known_init``), for which the images are specialised."""
    networks: int = Field(default=1, gt=0)
    """Networks per iteration (``sample_n_nets``); the gradient is their mean."""
    start: Literal["noise", "real"] = "noise"
    """Where the pixels start: standard Gaussian noise (DD) or random real images."""
    memory: Memory = "unrolled"
    """How the gradient through the T steps is computed; ``constant``: the same gradient in memory that
    does not grow with T (about twice the compute)."""
    checkpoint_every: int = Field(default=50, gt=0)


def check(cfg: Any) -> None:
    """The set must split into whole batches; a known-init set replays from its fixed networks, which
    only the distillation's own ConvNet has."""
    if cfg.ipc % cfg.distill.images_per_step:
        raise ValueError(
            f"ipc ({cfg.ipc}) must be a multiple of distill.images_per_step ({cfg.distill.images_per_step})"
        )
    own_network = cfg.evaluate.models == [CONVNET] and cfg.student == cfg.model
    if cfg.evaluate.recipe == "replay" and cfg.distill.init == "known" and not own_network:
        raise ValueError(
            "evaluate.recipe replay of a distill.init known set starts from the networks it was distilled"
            " for: evaluate.models [convnet] with the distillation's model (no evaluate.model)"
        )


def schedule(num_classes: int, ipc: int, per_step: int, epochs: int) -> list[Step]:
    """DD's T steps over a class-major set: batch s (images s * k .. s * k + k - 1 of every class),
    s = 0 .. ipc / k - 1, repeated ``epochs`` times (no augmentation: the seeds are unused)."""
    within = torch.arange(per_step)
    batches = [
        torch.cat([c * ipc + s * per_step + within for c in range(num_classes)])
        for s in range(ipc // per_step)
    ]
    return [Step(batch, 0) for _ in range(epochs) for batch in batches]


@register_method("dd", config=DDConfig, check=check, streams=True, shards=SHARED_NETWORK)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    cfg: DDConfig = inputs.method_cfg
    data = inputs.data
    generator = torch.Generator().manual_seed(inputs.seed)
    images = initial_images(
        data, inputs.ipc, cfg.start, generator, lambda seed: student_model(data, inputs.model_cfg, seed)
    )
    device = images.device
    labels = torch.arange(data.num_classes, device=device).repeat_interleave(inputs.ipc)
    steps = schedule(data.num_classes, inputs.ipc, cfg.images_per_step, cfg.epochs)
    images.requires_grad_(True)
    raw_lrs = torch.full((len(steps),), raw_step_size(cfg.lr_init), device=device, requires_grad=True)
    net = FlatParams(student_model(data, inputs.model_cfg, inputs.seed))

    def initialisation(seed: int) -> torch.Tensor:
        return upload(net.flatten(student_model(data, inputs.model_cfg, seed)), device)

    # known_init's networks are drawn before a resume restores the generator, so they are the same.
    known_seeds = [random_seed(generator) for _ in range(cfg.networks)] if cfg.init == "known" else []
    known = [initialisation(seed) for seed in known_seeds]
    optimizer = torch.optim.Adam([images, raw_lrs], lr=cfg.lr, betas=(0.5, 0.999))
    resumable = Resumable({"images": images, "raw_lrs": raw_lrs}, {"opt": optimizer}, generator)
    loop = ResumableLoop(
        "DD", cfg.iterations, cfg.checkpoint_every, checkpoints.save, resumable, "lower distill.lr"
    )
    start_it, history = loop.resume(checkpoints.load(), progress)

    rule = LearnedStepGD(raw_lrs)
    for it in range(start_it, cfg.iterations):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.decay_factor ** (it // cfg.decay_every)
        idx = real_batch(len(data.train_y), cfg.batch_real, generator)
        real, real_labels = data.images(idx), data.train_y[upload(idx, data.train_y.device)].to(device)
        inits = known or [initialisation(random_seed(generator)) for _ in range(cfg.networks)]
        optimizer.zero_grad(set_to_none=True)
        outcomes = [
            window_gradient(Inner(net, init, steps, rule), 0, real, real_labels, images, labels, cfg.memory)
            for init in inits
        ]
        for leaf in (images, raw_lrs):
            assert leaf.grad is not None  # window_gradient put it there
            leaf.grad /= len(inits)
        step_sizes = F.softplus(raw_lrs.detach())
        # The iteration's one read from the device: the loss decides whether the run goes on.
        loss, accuracy, lr_mean = torch.stack(
            [
                torch.stack([o.loss for o in outcomes]).mean(),
                torch.stack([o.accuracy for o in outcomes]).mean(),
                step_sizes.mean(),
            ]
        ).tolist()
        loop.check(it, loss)
        optimizer.step()
        history.append({"iteration": it + 1, "loss": loss, "accuracy": accuracy, "step_size_mean": lr_mean})
        progress.step(it + 1, cfg.iterations, f"loss {loss:.4f} acc {accuracy:.1f} step size {lr_mean:.4g}")
        loop.checkpoint(it, history)

    step_sizes = F.softplus(raw_lrs.detach())
    return SyntheticSet(
        images=images.detach().clone(),
        labels=labels,
        history=history,
        stats={
            "steps": float(len(steps)),
            "step_size_mean": step_sizes.mean().item(),
            "step_size_min": step_sizes.min().item(),
            "step_size_max": step_sizes.max().item(),
        },
        schedule=StepSchedule(
            indices=torch.stack([step.indices for step in steps]),
            step_sizes=step_sizes,
            init_seeds=torch.tensor(known_seeds) if known_seeds else None,
        ),
    )
