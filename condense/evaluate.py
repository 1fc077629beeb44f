"""Evaluation: train a fresh network only on a (distilled or real) set, test on the real test split.

Two recipes, each measured once at the end of training (no picking of a best test epoch):

- ``train_and_test``, MTT's ``evaluate_synset``: SGD with momentum 0.9 and weight decay 5e-4, DSA on
  every batch, the learning rate divided by 10 halfway. Evaluating distilled images without DSA, or
  with another architecture's norm, is the classic way to under-report them (MTT issue #29).
- ``train_and_test_kd``, the RDED/SRe2L recipe: AdamW, cosine schedule, crops + flips + CutMix
  (+ patch shuffling for stitched images), KL divergence to the teacher's probabilities on every
  augmented batch (online or replayed from storage, see ``condense.relabel``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condense.config import DSAConfig, ModelConfig
from condense.labels import kd_loss
from condense.models import build_model
from condense.prepare import PreparedDataset
from condense.progress import SILENT, Progress
from condense.relabel import KDAugment, Plans, Targets, num_batches, plan_inputs
from condense.training import accuracy, cosine_factor, sample_per_class, train_epoch


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    dsa: DSAConfig | None
    temperature: float | None = None
    """Set when training on soft labels (KD loss at this temperature)."""


def train_and_test(
    arch: str,
    data: PreparedDataset,
    x: torch.Tensor,
    targets: torch.Tensor,
    recipe: Recipe,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
) -> dict[str, float]:
    """Train ``arch`` from a seeded initialisation on (x, targets); returns test accuracy (%) and time.

    ``targets`` are class indices, or probability rows when ``recipe.temperature`` is set.
    """
    started = time.perf_counter()
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    half = recipe.epochs // 2
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[half] if half else [], gamma=0.1)
    if recipe.temperature is None:
        loss_fn = F.cross_entropy
    else:
        temperature = recipe.temperature

        def loss_fn(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            return kd_loss(logits, probs, temperature)

    generator = torch.Generator().manual_seed(seed)
    loss = float("nan")
    for epoch in range(recipe.epochs):
        loss = train_epoch(model, x, targets, loss_fn, optimizer, recipe.batch_size, generator, recipe.dsa)
        scheduler.step()
        progress.step(epoch + 1, recipe.epochs, f"loss {loss:.4f}")
    return {
        "accuracy": accuracy(model, data.test_x, data.test_y),
        "train_loss": loss,
        "seconds": time.perf_counter() - started,
    }


@dataclass(frozen=True)
class KDRecipe:
    epochs: int
    lr: float
    weight_decay: float
    final_lr_fraction: float
    batch_size: int
    temperature: float
    augment: KDAugment


def adamw_without_decay_on_norms(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices/kernels only, not on biases or norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def train_kd(
    arch: str,
    data: PreparedDataset,
    x: torch.Tensor,
    recipe: KDRecipe,
    seed: int,
    plans: Plans,
    targets: Targets,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
) -> tuple[nn.Module, float]:
    """Train ``arch`` by KD: each epoch follows ``plans(epoch)``, each batch learns ``targets``.
    Returns the model and the last epoch's mean loss."""
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed)
    optimizer = adamw_without_decay_on_norms(model, recipe.lr, recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: cosine_factor(epoch, recipe.epochs, recipe.final_lr_fraction)
    )
    loss = float("nan")
    for epoch in range(recipe.epochs):
        plan = plans(epoch)
        total = 0.0
        batches = num_batches(len(x), recipe.batch_size)
        for batch in range(batches):
            inputs = plan_inputs(x, plan, batch, recipe.batch_size, recipe.augment.factor)
            probs = targets(epoch, batch, inputs)
            model.train()
            step_loss = kd_loss(model(inputs), probs, recipe.temperature)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            total += float(step_loss.detach())
        scheduler.step()
        loss = total / batches
        progress.step(epoch + 1, recipe.epochs, f"kd loss {loss:.4f}")
    return model.eval(), loss


def train_and_test_kd(
    arch: str,
    data: PreparedDataset,
    x: torch.Tensor,
    recipe: KDRecipe,
    seed: int,
    plans: Plans,
    targets: Targets,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
) -> dict[str, float]:
    """:func:`train_kd`, then the test accuracy (%) of the final model."""
    started = time.perf_counter()
    model, loss = train_kd(arch, data, x, recipe, seed, plans, targets, model_cfg, progress)
    return {
        "accuracy": accuracy(model, data.test_x, data.test_y),
        "train_loss": loss,
        "seconds": time.perf_counter() - started,
    }


def random_real_subset(data: PreparedDataset, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real training images per class: the baseline every distilled set must beat."""
    generator = torch.Generator().manual_seed(seed)
    idx = sample_per_class(data.train_y, data.num_classes, ipc, generator)
    return data.train_x[idx], data.train_y[idx]


def summarize(accuracies: list[float]) -> dict[str, float | list[float]]:
    t = torch.tensor(accuracies, dtype=torch.float64)
    std = float(t.std(unbiased=False)) if len(accuracies) > 1 else 0.0
    return {
        "mean": round(float(t.mean()), 2),
        "std": round(std, 2),
        "runs": [round(a, 2) for a in accuracies],
    }
