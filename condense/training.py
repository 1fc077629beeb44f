"""The plain supervised loop shared by expert recording and evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig
from condense.devices import upload
from condense.models import CONVNET, build_model

if TYPE_CHECKING:
    from condense.prepare import RealData

_EVAL_BATCH = 1024

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_seed(generator: torch.Generator) -> int:
    """Draw a seed for a sub-step (a DSA transform, a batch order) from ``generator``."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def derived_seed(*parts: int) -> int:
    """A seed fixed by ``parts`` alone (e.g. run seed, iteration, class), well mixed, so work keyed
    by its position draws the same whatever ran before it (a resumed run, a shard)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device | None = None
) -> Iterator[torch.Tensor]:
    """One epoch's batches of indices in an order drawn from ``generator`` (on the CPU), copied to
    ``device`` once for the whole epoch (not once per batch: each blocking copy waits for the GPU)."""
    order = torch.randperm(n, generator=generator)
    yield from torch.split(order if device is None else upload(order, device), batch_size)


def shuffled(
    x: torch.Tensor, targets: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of one epoch over in-memory tensors, in an order drawn from
    ``generator``."""
    for idx in batches(len(x), batch_size, generator, x.device):
        yield x[idx], targets[idx]


def train_on(
    model: nn.Module,
    epoch: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    augment: DSAConfig | None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One pass over ``epoch``'s (inputs, targets) batches, DSA on every batch when ``augment`` is
    given (its seed drawn from ``generator``); ``forward`` (default: the model) computes the logits,
    e.g. a compiled version of the model. Returns the mean training loss per sample as a device
    scalar: a caller that logs it reads it (one wait per epoch), one that does not never waits."""
    model.train()
    total: torch.Tensor | None = None  # summed on the device: no host round trip per batch
    count = 0
    for inputs, targets in epoch:
        if augment is not None:
            inputs = dsa(inputs, augment, random_seed(generator))
        loss = loss_fn((forward or model)(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step = loss.detach().double() * len(targets)
        total = step if total is None else total + step
        count += len(targets)
    return total / count if total is not None else torch.tensor(float("nan"), dtype=torch.float64)


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    augment: DSAConfig | None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`train_on` one random-order pass over in-memory (x, targets)."""
    return train_on(
        model, shuffled(x, targets, batch_size, generator), loss_fn, optimizer, generator, augment, forward
    )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits for x, in eval mode, batched, on the model's device (x may live elsewhere)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)) for chunk in torch.split(x, batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    logits = predict(model, x)
    return float((logits.argmax(1) == y.to(logits.device)).float().mean() * 100)


def split_logits(model: nn.Module, data: RealData, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole split, read batch by batch (a streamed split never in memory)."""
    logits, labels = [], []
    for x, y in data.batches(split, _EVAL_BATCH):
        logits.append(predict(model, x, _EVAL_BATCH))
        labels.append(y.to(logits[-1].device))
    return torch.cat(logits), torch.cat(labels)


def drawn_batches(
    data: RealData, idx: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches of the training images at ``idx``: in an order drawn from
    ``generator``, as given without one. Only those images are read (a streamed dataset reads them by
    byte range), so a subset's epoch costs the subset, and row ``i`` is always image ``idx[i]``."""
    if generator is not None:
        idx = idx[upload(torch.randperm(len(idx), generator=generator), idx.device)]
    labels = data.train_y
    for chunk in torch.split(idx, batch_size):
        yield data.images(chunk), labels[upload(chunk, labels.device)]


def indexed_logits(model: nn.Module, data: RealData, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the training images at ``idx`` (all of them, in index order, when None), row ``i``
    for image ``idx[i]`` even on a stream that skips images it cannot decode (a draw never skips)."""
    if idx is None:
        idx = torch.arange(len(data.train_y))
    return torch.cat([predict(model, x, _EVAL_BATCH) for x, _ in drawn_batches(data, idx, _EVAL_BATCH)])


def split_accuracy(model: nn.Module, data: RealData, split: str = "test") -> float:
    """Top-1 accuracy (%) on a whole split of the real data."""
    correct, total = 0, 0
    for x, y in data.batches(split, _EVAL_BATCH):
        logits = predict(model, x, _EVAL_BATCH)
        correct += int((logits.argmax(1) == y.to(logits.device)).sum())
        total += len(y)
    return 100.0 * correct / total


def cosine_factor(step: float, steps: float, final_fraction: float = 0.0) -> float:
    """Cosine multiplier from 1 at ``step`` 0 to ``final_fraction`` at ``steps``."""
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * step / steps))


def student_model(data: RealData, model_cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """The distillation architecture (ConvNet) for this dataset."""
    model = build_model(CONVNET, data.channels, data.num_classes, data.resolution, model_cfg, seed)
    return model.to(data.device, non_blocking=True)  # built on the CPU (its seeded init); no wait
