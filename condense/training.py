"""The plain supervised loop shared by expert recording and evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from condense.augment import dsa
from condense.config import DSAConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_seed(generator: torch.Generator) -> int:
    """Draw a seed for a sub-step (a DSA transform, a batch order) from ``generator``."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    yield from torch.split(order, batch_size)


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
) -> float:
    """One pass over (x, targets) in random order, DSA on every batch when ``augment`` is given;
    ``forward`` (default: the model) computes the logits, e.g. a compiled version of the model.

    Returns the mean training loss.
    """
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=x.device)  # no host round trip per batch
    for idx in batches(len(x), batch_size, generator):
        idx = idx.to(x.device)
        inputs = x[idx]
        if augment is not None:
            inputs = dsa(inputs, augment, random_seed(generator))
        loss = loss_fn((forward or model)(inputs), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().double() * len(idx)
    return float(total) / max(len(x), 1)


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


def sample_per_class(
    labels: torch.Tensor, num_classes: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of ``k`` random samples of each class, class-major (k of class 0, then class 1, ...)."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picks)


def cosine_factor(step: float, steps: float, final_fraction: float = 0.0) -> float:
    """Cosine multiplier from 1 at ``step`` 0 to ``final_fraction`` at ``steps``."""
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * step / steps))
