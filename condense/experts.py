"""Expert trajectories (MTT's buffer.py): train a network on the real data and snapshot its
parameters at initialisation and after every epoch.

The recipe is MTT's on purpose: plain SGD, constant learning rate, no momentum or weight decay,
DSA on every batch. Synthetic data imitates such trajectories more easily (MTT issue #8); changing
the expert recipe shifts everything downstream. Published variants are options:
``experts.optimizer: gsam`` (FTD's flat trajectories, :mod:`condense.gsam`), ``experts.schedule``
(PAD's easy-to-hard data per epoch, :mod:`condense.difficulty`) and AST's smooth experts (Shen et
al., buffer.py): SGD with ``momentum`` and ``weight_decay``, a learning-rate step
(``lr_step_factor``), and the objective of :class:`ExpertObjective` (the clipping loss
``loss_decay_epochs`` and the gradient penalty ``gradient_penalty``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from condense.config import DSAConfig, ExpertsConfig, ModelConfig
from condense.devices import Compiled
from condense.difficulty import DifficultyOrder, epoch_indices
from condense.errors import DivergenceError
from condense.gsam import GSAM, BatchReplay
from condense.models import FlatParams
from condense.prepare import RealData
from condense.training import LossFn, drawn_batches, split_accuracy, student_model, train_on

EpochCallback = Callable[[int, float], None]
Forward = Callable[[torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Trajectory:
    """``params[e]`` is the flat parameter vector after ``e`` epochs (``e = 0``: initialisation)."""

    params: np.ndarray
    train_loss: list[float] = field(default_factory=list)
    epoch_sizes: list[int] = field(default_factory=list)
    """Training images each epoch saw (fewer than all under a difficulty schedule)."""
    train_accuracy: float = 0.0
    test_accuracy: float = 0.0


def expert_seed(seed: int, index: int) -> int:
    return seed * 1000 + index


def gradient_penalty(model: torch.nn.Module, images: torch.Tensor, weight: float) -> torch.Tensor:
    """AST's ``epoch_gp`` term: ``weight * mean_{b,h,w} (||d S / d x[b, :, h, w]||_2 - 1)^2`` with ``S``
    the sum of all logits of ``model`` on ``images``, differentiable in the parameters (double backprop)."""
    x = images.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    return weight * (torch.linalg.vector_norm(grad, dim=1) - 1).pow(2).mean()


def clipping_scale(epoch: int, decay_epochs: int) -> float:
    """AST's clipping loss: the factor on epoch ``epoch``'s (0-based) cross-entropy."""
    return (1 + epoch / decay_epochs) / 2 if epoch < decay_epochs else 1.0


class ExpertObjective:
    """An expert's loss on a batch: ``scale * CE(logits, targets)``, plus AST's gradient penalty on the
    batch's un-augmented images when ``penalty`` > 0. Give the epoch's batches through :meth:`batches`
    (it keeps each batch's images before DSA sees them); set ``scale`` per epoch. At ``scale`` 1 and no
    penalty it is plain cross-entropy."""

    def __init__(self, model: torch.nn.Module, penalty: float):
        self.model, self.penalty = model, penalty
        self.scale = 1.0
        self._images: torch.Tensor | None = None

    def batches(self, epoch: Iterable[Batch]) -> Iterator[Batch]:
        for images, targets in epoch:
            self._images = images
            yield images, targets

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets)
        if self.scale != 1.0:
            loss = loss * self.scale
        if self.penalty > 0:
            if self._images is None:
                raise RuntimeError("the gradient penalty needs the batch: give the epoch through batches()")
            loss = loss + gradient_penalty(self.model, self._images, self.penalty)
        return loss


def expert_optimizer(
    model: torch.nn.Module,
    cfg: ExpertsConfig,
    forward: Forward,
    loss_fn: LossFn = F.cross_entropy,
    lr: float | None = None,
) -> tuple[torch.optim.Optimizer, Forward, LossFn]:
    """(optimizer, forward, loss) for :func:`condense.training.train_epoch`: SGD at ``lr`` (default
    ``cfg.lr``) on ``loss_fn``, or GSAM around it, whose second gradient replays the batch (and its DSA
    draw) the loop just evaluated."""
    sgd = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr if lr is None else lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    if cfg.optimizer == "sgd":
        return sgd, forward, loss_fn
    replay = BatchReplay(model, forward, loss_fn)
    gsam = GSAM(sgd, cfg.rho, cfg.gsam_alpha, cfg.adaptive, closure=replay.closure)
    return gsam, replay.forward, replay.loss


def train_expert(
    data: RealData,
    model_cfg: ModelConfig,
    cfg: ExpertsConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
    compile_step: bool = False,
    order: DifficultyOrder | None = None,
    start: torch.Tensor | None = None,
) -> Trajectory:
    """Train one expert from a seeded initialisation; deterministic for a given seed on CPU.
    ``compile_step``: run the forward pass through ``torch.compile`` (see :class:`Compiled`).
    ``order``: the easy-to-hard order of the training images, needed when ``cfg.schedule`` is set
    (each epoch then trains on the slice :func:`condense.difficulty.epoch_indices` picks).
    ``start``: flat parameters to start from instead (PDD's experts regenerated after a stage)."""
    if cfg.schedule is not None and order is None:
        raise ValueError("experts.schedule needs the difficulty order of the training images")
    model = student_model(data, model_cfg, seed)
    if start is not None:
        FlatParams(model).load_into(start.to(data.device))
    compiled = Compiled(model, compile_step, data.device)
    objective = ExpertObjective(model, cfg.gradient_penalty)
    optimizer, forward, loss_fn = expert_optimizer(model, cfg, compiled, objective)
    flat = FlatParams(model)
    generator = torch.Generator().manual_seed(seed)
    snapshots = [flat.flatten().cpu().numpy()]
    losses, sizes = [], []
    for epoch in range(cfg.epochs):
        objective.scale = clipping_scale(epoch, cfg.loss_decay_epochs)
        if cfg.schedule is not None and order is not None:
            picked = epoch_indices(order, cfg.schedule, epoch)
            batches, size = drawn_batches(data, picked, cfg.batch_size, generator), len(picked)
        else:
            batches, size = data.batches("train", cfg.batch_size, generator), len(data.train_y)
        batches = objective.batches(batches)
        epoch_loss = train_on(
            model, batches, loss_fn, optimizer, generator, dsa_cfg if cfg.dsa else None, forward
        )
        # The epoch's one copy to the host: its loss and its snapshot together (float64 holds both;
        # the parameters round-trip float32 -> float64 -> float32 exactly).
        read = torch.cat([epoch_loss.reshape(1).double(), flat.flatten().detach().double()]).cpu()
        loss = float(read[0])
        if not np.isfinite(loss):
            raise DivergenceError(f"expert {seed} diverged at epoch {epoch + 1}; lower experts.lr")
        losses.append(loss)
        sizes.append(size)
        snapshots.append(read[1:].float().numpy())
        if on_epoch is not None:
            on_epoch(epoch + 1, loss)
        if epoch == cfg.epochs // 2 + 1 and cfg.lr_step_factor != 1:
            # buffer.py builds a new optimizer at the lower rate: the momentum buffers start again.
            lr = cfg.lr * cfg.lr_step_factor
            optimizer, forward, loss_fn = expert_optimizer(model, cfg, compiled, objective, lr)
    return Trajectory(
        params=np.stack(snapshots).astype(np.float32),
        train_loss=losses,
        epoch_sizes=sizes,
        train_accuracy=split_accuracy(model, data, "train"),
        test_accuracy=split_accuracy(model, data, "test"),
    )
