"""Expert trajectories (MTT's buffer.py): train a network on the real data and snapshot its
parameters at initialisation and after every epoch.

The recipe is MTT's on purpose: plain SGD, constant learning rate, no momentum or weight decay,
DSA on every batch. Synthetic data imitates such trajectories more easily (MTT issue #8); changing
the expert recipe shifts everything downstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from condense.config import DSAConfig, ExpertsConfig, ModelConfig
from condense.devices import Compiled
from condense.models import CONVNET, FlatParams, build_model
from condense.prepare import PreparedDataset
from condense.training import accuracy, train_epoch

EpochCallback = Callable[[int, float], None]


@dataclass
class Trajectory:
    """``params[e]`` is the flat parameter vector after ``e`` epochs (``e = 0``: initialisation)."""

    params: np.ndarray
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: float = 0.0
    test_accuracy: float = 0.0


def expert_seed(seed: int, index: int) -> int:
    return seed * 1000 + index


def student_model(data: PreparedDataset, model_cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """The distillation architecture (ConvNet) for this dataset."""
    model = build_model(CONVNET, data.channels, data.num_classes, data.resolution, model_cfg, seed)
    return model.to(data.train_x.device)


def train_expert(
    data: PreparedDataset,
    model_cfg: ModelConfig,
    cfg: ExpertsConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
    compile_step: bool = False,
) -> Trajectory:
    """Train one expert from a seeded initialisation; deterministic for a given seed on CPU.
    ``compile_step``: run the forward pass through ``torch.compile`` (see :class:`Compiled`)."""
    model = student_model(data, model_cfg, seed)
    forward = Compiled(model, compile_step, data.train_x.device)
    flat = FlatParams(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    snapshots = [flat.flatten().cpu().numpy()]
    losses = []
    for epoch in range(cfg.epochs):
        loss = train_epoch(
            model,
            data.train_x,
            data.train_y,
            F.cross_entropy,
            optimizer,
            cfg.batch_size,
            generator,
            dsa_cfg if cfg.dsa else None,
            forward,
        )
        if not np.isfinite(loss):
            raise FloatingPointError(f"expert {seed} diverged at epoch {epoch + 1}; lower experts.lr")
        losses.append(loss)
        snapshots.append(flat.flatten().cpu().numpy())  # one copy to the host per epoch
        if on_epoch is not None:
            on_epoch(epoch + 1, loss)
    return Trajectory(
        params=np.stack(snapshots).astype(np.float32),
        train_loss=losses,
        train_accuracy=accuracy(model, data.train_x, data.train_y),
        test_accuracy=accuracy(model, data.test_x, data.test_y),
    )
