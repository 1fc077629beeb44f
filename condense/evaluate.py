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

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig
from condense.devices import Compiled
from condense.labels import kd_loss
from condense.models import build_model
from condense.prepare import PreparedDataset
from condense.progress import SILENT, Progress
from condense.relabel import KDAugment, Plans, Targets, num_batches, plan_inputs
from condense.training import accuracy, batches, cosine_factor, random_seed, sample_per_class, train_epoch


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
    compile_step: bool = False,
) -> dict[str, float]:
    """Train ``arch`` from a seeded initialisation on (x, targets); returns test accuracy (%) and time.

    ``targets`` are class indices, or probability rows when ``recipe.temperature`` is set.
    """
    started = time.perf_counter()
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed).to(x.device)
    forward = Compiled(model, compile_step, x.device)
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
        loss = train_epoch(
            model, x, targets, loss_fn, optimizer, recipe.batch_size, generator, recipe.dsa, forward
        )
        scheduler.step()
        progress.step(epoch + 1, recipe.epochs, f"loss {loss:.4f}")
    return {
        "accuracy": accuracy(model, data.test_x, data.test_y),
        "train_loss": loss,
        "seconds": time.perf_counter() - started,
    }


def batchable(model: nn.Module) -> bool:
    """Seeds of this network can train together (no batch norm: its running statistics do not vmap)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_and_test_seeds(
    arch: str,
    data: PreparedDataset,
    xs: list[torch.Tensor],
    targets: list[torch.Tensor],
    recipe: Recipe,
    seeds: list[int],
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    compile_step: bool = False,
) -> list[dict[str, float]]:
    """:func:`train_and_test` for several seeds at once: their networks are stacked
    (``torch.func.stack_module_state``) and every step is one vmapped forward and backward for all of
    them, so a GPU runs K small trainings as one instead of K launch-bound ones.

    Each seed keeps what it has alone: its initialisation, its generator (batch order, then one DSA
    seed per batch, drawn in the same order), its set (``xs[k]``, e.g. its random real images) and
    the recipe's SGD (momentum, weight decay, learning rate /10 halfway), which acts on each seed's
    slice of the stacked parameters exactly as on its own. The result equals the one-at-a-time
    training up to floating-point rounding (batched convolutions sum in another order)."""
    started = time.perf_counter()
    device = xs[0].device
    models = [
        build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, s) for s in seeds
    ]
    if len(seeds) == 1 or not batchable(models[0]):
        return [
            train_and_test(arch, data, x, t, recipe, seed, model_cfg, progress, compile_step)
            for x, t, seed in zip(xs, targets, seeds, strict=True)
        ]
    params, buffers = stack_module_state([m.to(device) for m in models])
    shape = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(shape, (p, b), (x,))

    stacked = Compiled(vmap(forward), compile_step, device)
    optimizer = torch.optim.SGD(
        list(params.values()), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    half = recipe.epochs // 2
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[half] if half else [], gamma=0.1)
    temperature = recipe.temperature
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    n, k = len(xs[0]), len(seeds)
    losses = torch.zeros(k, dtype=torch.float64, device=device)
    for epoch in range(recipe.epochs):
        orders = [batches(n, recipe.batch_size, g) for g in generators]
        losses.zero_()
        for picks in zip(*orders, strict=True):
            inputs, labels = [], []
            for seed_index, idx in enumerate(picks):
                idx = idx.to(device)
                batch = xs[seed_index][idx]
                if recipe.dsa is not None:
                    batch = dsa(batch, recipe.dsa, random_seed(generators[seed_index]))
                inputs.append(batch)
                labels.append(targets[seed_index][idx])
            logits = stacked(params, buffers, torch.stack(inputs))
            per_seed = torch.stack(
                [
                    F.cross_entropy(logits[i], labels[i])
                    if temperature is None
                    else kd_loss(logits[i], labels[i], temperature)
                    for i in range(k)
                ]
            )
            optimizer.zero_grad(set_to_none=True)
            per_seed.sum().backward()  # seeds share no parameter: each gets its own gradient
            optimizer.step()
            losses += per_seed.detach().double() * len(picks[0])
        scheduler.step()
        progress.step(epoch + 1, recipe.epochs, f"{k} seeds, loss {float(losses.mean()) / n:.4f}")
    with torch.no_grad():
        correct = torch.zeros(k, device=device)
        for chunk, labels in zip(torch.split(data.test_x, 1024), torch.split(data.test_y, 1024), strict=True):
            predicted = vmap(forward, in_dims=(0, 0, None))(params, buffers, chunk.to(device)).argmax(-1)
            correct += (predicted == labels.to(device)).sum(1)
    seconds = (time.perf_counter() - started) / k
    return [
        {"accuracy": float(c) / len(data.test_y) * 100, "train_loss": float(loss) / n, "seconds": seconds}
        for c, loss in zip(correct, losses, strict=True)
    ]


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
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed).to(x.device)
    optimizer = adamw_without_decay_on_norms(model, recipe.lr, recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: cosine_factor(epoch, recipe.epochs, recipe.final_lr_fraction)
    )
    loss = float("nan")
    for epoch in range(recipe.epochs):
        plan = plans(epoch)
        total = torch.zeros((), dtype=torch.float64, device=x.device)  # no host round trip per batch
        count = num_batches(len(x), recipe.batch_size)
        for batch in range(count):
            inputs = plan_inputs(x, plan, batch, recipe.batch_size, recipe.augment.factor)
            probs = targets(epoch, batch, inputs).to(inputs.device)
            model.train()
            step_loss = kd_loss(model(inputs), probs, recipe.temperature)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            total += step_loss.detach().double()
        scheduler.step()
        loss = float(total) / count
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
