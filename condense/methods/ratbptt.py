"""RaT-BPTT: Embarrassingly Simple Dataset Distillation (Feng, Vedantam, Kempe, ICLR 2024; official
code fengyzpku/Simple_Dataset_Distillation), and the loop AT-BPTT (:mod:`condense.methods.atbptt`)
runs with its own window placement.

The synthetic set is optimised as the bilevel problem itself, by Random Truncated BPTT. Each outer
iteration:

1. place the window: its start s is drawn uniformly from [``min_start``, N - W] (N = ``unroll``,
   W = ``window``) once every ``window_every`` iterations, from the run's seed and the draw's number
   (``placement: end`` keeps it at N - W: the README's ``--cctype 0`` runs);
2. initialise a fresh network theta_0;
3. train it s steps on synthetic batches (``images_per_class`` images of each of ``classes_per_step``
   random classes, augmented) with Adam (lr ``inner_lr``), keeping no graph;
4. train it W more steps with a differentiable Adam, keeping the graph (the window);
5. loss = cross-entropy of the trained network on an augmented real batch of ``batch_real`` images;
6. its gradient through the window (:mod:`condense.methods.bptt`, ``memory: unrolled`` or the
   constant-memory walk) reaches the pixels and, with ``labels: learned``, the label logits; the
   pixel gradient is clipped to twice an exponential moving average of its norm (``clip_ema``);
   one Adam step (lr ``lr``; labels at ``lr / label_lr_scale``).

Deviations from the official code, stated:

- learned labels are logits trained through softmax (inner loss: soft cross-entropy against
  softmax(logits)), as DATM's and as the evaluation trains on them (``evaluate.labels: learned``);
  the official code learns non-negative label rows used unnormalised as cross-entropy targets and
  clipped at 0. They start at ``label_init_confidence`` on the true class (the official: one-hot);
- the window is drawn from (seed, draw number), not Python's global ``random``; real batches are
  drawn independently each iteration (the official loader walks epochs); ``window_every`` None is one
  draw per pass over the training split, as the official loop (``--complete_random`` is 1);
- ZCA is the project's (``dataset.zca``: kornia's eps 0.1), not the official regularisation of 0.1
  times the mean eigenvalue; augmentation is :func:`condense.augment.dsa` with the run's ``dsa``
  settings (the recipes set ``flip_rotate`` where the papers do; one family per call, as the official
  ``ImageIntervention``);
- the official evaluation trains with the inner Adam for 300/600/1000/3000 epochs and keeps the best;
  here ``evaluate.optimizer: adam`` (with ``evaluate.adam_lr``) trains fresh networks with Adam under
  the pipeline's recipe (its epochs, a tenfold drop at half, the final epoch reported), beside MTT's
  SGD recipe, the default, so the leaderboard scores both; paper numbers are not this pipeline's;
  multi-GPU data parallelism is not built;
- a non-finite loss stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, model_validator

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig, Strict, added
from condense.devices import upload
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, Resumable, ResumableLoop, SyntheticSet
from condense.methods.bptt import (
    SHARED_NETWORK,
    Adam,
    Inner,
    Memory,
    class_balanced_steps,
    draw_generator,
    real_batch,
    unit_norm_noise,
    window_gradient,
)
from condense.methods.initial import init_real
from condense.models import FlatParams
from condense.prepare import RealData
from condense.training import random_seed, student_model


class RaTBPTTConfig(Strict):
    iterations: int = Field(default=2000, gt=0)
    """Outer steps (the official ``--epoch`` times the real batches in one pass)."""
    unroll: int = Field(default=200, gt=0)
    """N (``--totwindow``): the window ends at step N at the latest."""
    window: int = Field(default=60, gt=0)
    """W (``--window``): inner steps the gradient goes through."""
    min_start: int = Field(default=0, ge=0)
    """``--minwindow``: the earliest window start."""
    placement: Literal["random", "end"] = "random"
    """``random`` (``--cctype 2``): start uniform in [min_start, N - W]; ``end`` (``--cctype 0``): N - W."""
    window_every: int | None = Field(default=None, gt=0)
    """Iterations between window draws; None: one pass of the real training split (ceil(train
    images / batch_real)), as the official loop draws once per epoch."""
    inner_lr: float = Field(default=0.001, gt=0)
    """The inner Adam's learning rate (``--inner_lr``)."""
    lr: float = Field(default=0.001, gt=0)
    """The outer Adam's learning rate on the pixels (``--lr``)."""
    label_lr_scale: float = Field(default=1.0, gt=0)
    """The labels' learning rate is ``lr / label_lr_scale`` (``--label_lr_scale``)."""
    batch_real: int = Field(default=5000, gt=0)
    """Real images in the outer loss's batch (``--batch_size``; the official code: as large as fits)."""
    images_per_class: int | None = Field(default=None, gt=0)
    """Synthetic images of each class in one inner step (``--batch_per_class``); None: all of them."""
    classes_per_step: int | None = Field(default=None, gt=0)
    """Classes in one inner step (``--task_sampler_nc``); None: all of them."""
    labels: Literal["hard", "learned"] = "hard"
    """``learned`` (``--train_y``): one logit vector per image, optimised with the pixels, stored with
    them and trained on by ``evaluate.labels: learned``."""
    label_init_confidence: float = Field(default=0.9, gt=0, lt=1)
    """Learned labels start at this softmax probability on the true class, the rest spread evenly."""
    init: Literal["noise", "real"] = "noise"
    """``noise``: Gaussian images projected to unit norm each (the official start); ``real``: random
    real images."""
    augment: bool = True
    """DSA (the run's ``dsa`` settings) on every synthetic and real batch."""
    clip_ema: float | None = Field(default=0.9, gt=0, lt=1)
    """Decay of the moving average of the pixel gradient's norm; the gradient is clipped to twice it
    (``--clip_coef``). None: no clipping."""
    memory: Memory = "unrolled"
    """How the gradient through the window is computed; ``constant``: the same gradient in memory that
    does not grow with the window (about twice the compute)."""
    mask_ratio: float = added(0.0, ge=0, lt=1)
    """MDT (Zhu et al., ICCV 2023; our reading, the paper's code is not public): every synthetic batch
    of the inner run, after DSA, is multiplied by a fresh Bernoulli mask zeroing this share of its
    input values (masked temperature scaling's mask), seeded by the step's seed; 0: off. See
    :class:`condense.methods.mtt.MTTConfig`'s ``mask_ratio``."""
    checkpoint_every: int = Field(default=100, gt=0)

    @model_validator(mode="after")
    def _window_fits(self) -> RaTBPTTConfig:
        if self.window + self.min_start > self.unroll:
            raise ValueError(
                f"window + min_start ({self.window} + {self.min_start}) must not exceed"
                f" unroll ({self.unroll})"
            )
        return self


@dataclass(frozen=True)
class Window:
    """The steps an iteration differentiates through: ``start .. start + length - 1``."""

    start: int
    length: int


class Placement(Protocol):
    """Where each iteration's window lies; its state is checkpointed with the run."""

    def place(self, iteration: int, images: torch.Tensor, targets: torch.Tensor) -> Window: ...

    def observe(self, iteration: int, accuracy: float) -> None:
        """The iteration's accuracy on its real batch (AT-BPTT's stages follow it)."""
        ...

    def record(self) -> dict[str, float]:
        """What the history keeps of the placement after an iteration, besides the window."""
        ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class InnerRuns:
    """What every inner run of a run shares: it makes one with a fresh network and its batches."""

    net: FlatParams
    data: RealData
    model_cfg: ModelConfig
    ipc: int
    cfg: RaTBPTTConfig
    augment: DSAConfig | None

    def draw(self, steps: int, generator: torch.Generator) -> Inner:
        """A fresh network (its seed drawn first) and ``steps`` synthetic batches, from ``generator``."""
        init = self.net.flatten(student_model(self.data, self.model_cfg, random_seed(generator)))
        classes = self.data.num_classes
        batches = class_balanced_steps(
            classes,
            self.ipc,
            min(self.cfg.images_per_class or self.ipc, self.ipc),
            min(self.cfg.classes_per_step or classes, classes),
            steps,
            generator,
        )
        return Inner(
            self.net,
            upload(init, self.data.device),
            batches,
            Adam(self.cfg.inner_lr),
            self.augment,
            self.cfg.mask_ratio,
        )


@dataclass
class RandomWindow:
    """RaT-BPTT's window: W steps starting uniformly in [min_start, N - W] (or at N - W), redrawn every
    ``every`` iterations from (seed, draw number) alone."""

    cfg: RaTBPTTConfig
    seed: int
    every: int

    def place(self, iteration: int, images: torch.Tensor, targets: torch.Tensor) -> Window:
        return random_window(self.cfg, self.seed, iteration // self.every)

    def observe(self, iteration: int, accuracy: float) -> None:
        """RaT-BPTT's window does not depend on how the run goes."""

    def record(self) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the window is a function of the seed and the iteration."""


def random_window(cfg: RaTBPTTConfig, seed: int, draw: int) -> Window:
    """The ``draw``-th window of a run seeded ``seed``."""
    latest = cfg.unroll - cfg.window
    if cfg.placement == "end":
        return Window(latest, cfg.window)
    offset = int(torch.randint(latest - cfg.min_start + 1, (1,), generator=draw_generator(seed, draw)))
    return Window(cfg.min_start + offset, cfg.window)


def draws_every(cfg: RaTBPTTConfig, data: RealData) -> int:
    """Iterations between window draws: ``window_every``, or one pass of the training split."""
    return cfg.window_every or math.ceil(len(data.train_y) / cfg.batch_real)


PlacementFactory = Callable[[RaTBPTTConfig, int, int, InnerRuns], Placement]
"""(config, seed, iterations between draws, the inner runs) -> the run's window placement."""


@register_method("ratbptt", config=RaTBPTTConfig, streams=True, shards=SHARED_NETWORK)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    return distill_by_windows(
        inputs, checkpoints, progress, "RaT-BPTT", lambda cfg, seed, every, _: RandomWindow(cfg, seed, every)
    )


def distill_by_windows(
    inputs: DistillInputs,
    checkpoints: Checkpoints,
    progress: Progress,
    name: str,
    placement: PlacementFactory,
) -> SyntheticSet:
    """The loop of the module docstring, configured by ``inputs.method_cfg`` (a :class:`RaTBPTTConfig`),
    its windows placed by ``placement``."""
    cfg: RaTBPTTConfig = inputs.method_cfg
    data = inputs.data
    generator = torch.Generator().manual_seed(inputs.seed)
    shape = (data.num_classes * inputs.ipc, data.channels, data.resolution, data.resolution)
    if cfg.init == "noise":
        images = upload(unit_norm_noise(shape, generator), data.device)
    else:
        images = init_real(data, inputs.ipc, generator)
    device = images.device
    labels = torch.arange(data.num_classes, device=device).repeat_interleave(inputs.ipc)
    images.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": [images]}]
    tensors = {"images": images}
    targets: torch.Tensor = labels
    if cfg.labels == "learned":
        targets = initial_label_logits(labels, data.num_classes, cfg.label_init_confidence)
        initial_logits = targets.clone()
        tensors["label_logits"] = targets.requires_grad_(True)
        groups.append({"params": [targets], "lr": cfg.lr / cfg.label_lr_scale})
    grad_norm_ema = torch.zeros((), device=device)
    tensors["grad_norm_ema"] = grad_norm_ema
    optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    resumable = Resumable(tensors, {"opt": optimizer}, generator)
    loop = ResumableLoop(
        name, cfg.iterations, cfg.checkpoint_every, checkpoints.save, resumable, "lower distill.lr"
    )
    state = checkpoints.load()
    start_it, history = loop.resume(state, progress)

    runs = InnerRuns(
        FlatParams(student_model(data, inputs.model_cfg, inputs.seed)),
        data,
        inputs.model_cfg,
        inputs.ipc,
        cfg,
        inputs.dsa_cfg if cfg.augment else None,
    )
    windows = placement(cfg, inputs.seed, draws_every(cfg, data), runs)
    if state is not None:
        windows.restore(state["windows"])
    for it in range(start_it, cfg.iterations):
        window = windows.place(it, images.detach(), targets.detach())
        inner = runs.draw(window.start + window.length, generator)
        idx = real_batch(len(data.train_y), cfg.batch_real, generator)
        real, real_labels = data.images(idx), data.train_y[upload(idx, data.train_y.device)].to(device)
        if runs.augment is not None:
            real = dsa(real, runs.augment, random_seed(generator))
        optimizer.zero_grad(set_to_none=True)
        outcome = window_gradient(inner, window.start, real, real_labels, images, targets, cfg.memory)
        assert images.grad is not None  # window_gradient put it there
        grad_norm = images.grad.norm()
        if cfg.clip_ema is not None:
            clip_to_moving_norm(images.grad, grad_norm, grad_norm_ema, cfg.clip_ema, first=it == 0)
        # The iteration's one read from the device: the loss decides whether the run goes on.
        loss, accuracy, norm = torch.stack([outcome.loss, outcome.accuracy, grad_norm]).tolist()
        loop.check(it, loss)
        optimizer.step()
        windows.observe(it, accuracy)
        history.append(
            {
                "iteration": it + 1,
                "loss": loss,
                "accuracy": accuracy,
                "grad_norm": norm,
                "window_start": window.start,
                "window": window.length,
                **windows.record(),
            }
        )
        progress.step(
            it + 1,
            cfg.iterations,
            f"loss {loss:.4f} acc {accuracy:.1f} window {window.start}..{window.start + window.length}",
        )
        loop.checkpoint(it, history, windows=windows.state())

    stats = {"mean_window": sum(h["window"] for h in history) / max(len(history), 1)}
    if cfg.labels == "learned":
        stats["label_logits_moved"] = (targets.detach() - initial_logits).abs().mean().item()
    return SyntheticSet(
        images=images.detach().clone(),
        labels=labels,
        label_logits=targets.detach().clone() if cfg.labels == "learned" else None,
        history=history,
        stats=stats,
    )


def initial_label_logits(labels: torch.Tensor, num_classes: int, confidence: float) -> torch.Tensor:
    """Logits whose softmax puts ``confidence`` on each image's class and the rest evenly elsewhere."""
    if num_classes == 1:
        return torch.zeros(len(labels), 1, device=labels.device)
    top = math.log(confidence * (num_classes - 1) / (1 - confidence))
    return torch.nn.functional.one_hot(labels, num_classes).float() * top


def clip_to_moving_norm(
    grad: torch.Tensor, norm: torch.Tensor, average: torch.Tensor, decay: float, first: bool
) -> None:
    """RaT-BPTT's clipping: update the moving average of the gradient's norm with this ``norm`` (set it
    on the ``first`` iteration), then scale ``grad`` down to at most twice the average, in place and
    on the device (torch's clip_grad_norm_ with max_norm 2 * average)."""
    with torch.no_grad():
        if first:
            average.copy_(norm)
        else:
            average.sub_((1 - decay) * (average - norm))
        grad.mul_((2 * average / (norm + 1e-6)).clamp(max=1.0))
