"""Difficulty-ordered expert data (PAD: Li et al., "Prioritize Alignment in Dataset Distillation",
2024; its buffer_CL.py): EL2N difficulty scores and the schedule of which images each expert epoch
trains on.

EL2N (Paul et al., NeurIPS 2021) of an image ``(x, y)`` is ``|| softmax(f(x)) - onehot(y) ||_2``
early in training, averaged over networks trained from different seeds: low is easy. Each class's
images are ordered by it from easy to hard; :func:`epoch_window` then says which slice of each class
an expert epoch sees (:class:`condense.config.ExpertScheduleConfig` has the phases).

Deviations from PAD: PAD's README sorts CIFAR by precomputed GraNd scores (DeepCore) while the paper
names EL2N; here the scores are EL2N, computed by the ``difficulty`` stage with ConvNets trained on
this data with the experts' SGD recipe (learning rate, momentum, weight decay, batch size, DSA) and
scored on un-augmented images in eval mode. PAD's loop assumes 5,000 images in every class; here
each class's slice is taken of its own count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from condense.config import DSAConfig, ExpertScheduleConfig, ExpertsConfig, ModelConfig
from condense.errors import ConfigError
from condense.models import CONVNET, build_model
from condense.prepare import RealData
from condense.store import Store, load_arrays, save_arrays
from condense.training import indexed_logits, train_on

STAGE = "difficulty"
ORDER = "difficulty.zarr"

# Scoring networks draw their seeds from a range of their own, so none starts where an expert starts
# (experts use seed * 1000 + index).
SCORING_SEED_OFFSET = 1 << 24


def el2n(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image EL2N score from a model's logits: ``|| softmax(f(x)) - onehot(y) ||_2``."""
    probs = logits.float().softmax(dim=1)
    return torch.linalg.vector_norm(probs - F.one_hot(y.to(probs.device), num_classes).float(), dim=1)


def scoring_seed(seed: int, index: int) -> int:
    return SCORING_SEED_OFFSET + seed * 1000 + index


def el2n_scores(
    data: RealData,
    model_cfg: ModelConfig,
    experts: ExpertsConfig,
    schedule: ExpertScheduleConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    on_model: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Every training image's EL2N score, the mean over ``schedule.el2n_models`` ConvNets each trained
    ``schedule.el2n_epochs`` epochs with the experts' plain SGD recipe (deterministic per seed)."""
    total = torch.zeros(len(data.train_y), device=data.device)
    for index in range(schedule.el2n_models):
        net_seed = scoring_seed(seed, index)
        model = build_model(CONVNET, data.channels, data.num_classes, data.resolution, model_cfg, net_seed)
        model = model.to(data.device, non_blocking=True)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=experts.lr, momentum=experts.momentum, weight_decay=experts.weight_decay
        )
        generator = torch.Generator().manual_seed(net_seed)
        for _ in range(schedule.el2n_epochs):
            epoch = data.batches("train", experts.batch_size, generator)
            train_on(model, epoch, F.cross_entropy, optimizer, generator, dsa_cfg if experts.dsa else None)
        total += el2n(indexed_logits(model, data), data.train_y, data.num_classes)
        if on_model is not None:
            on_model(index + 1)
    return total / schedule.el2n_models


@dataclass
class DifficultyOrder:
    """Every training index, class by class (class 0 first), easiest first within each class."""

    indices: torch.Tensor
    counts: list[int]
    """Images per class: ``indices`` splits into consecutive runs of these lengths."""

    def by_class(self) -> list[torch.Tensor]:
        return list(torch.split(self.indices, self.counts))


def difficulty_order(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> DifficultyOrder:
    """Each class's indices sorted by score, ascending (easy to hard); ties keep index order."""
    runs = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        runs.append(members[torch.sort(scores[members], stable=True).indices])
    return DifficultyOrder(torch.cat(runs), [len(r) for r in runs])


def linear_ratio(epoch: int, init_ratio: float, add_end_epoch: int) -> float:
    """PAD's ``linear_cl_scheduler_acse``: the easy fraction grows linearly from ``init_ratio`` at
    epoch 0 to 1 at ``add_end_epoch``."""
    return min(1, 1.0 * init_ratio + (1 - init_ratio) * 1.0 * epoch / add_end_epoch)


def epoch_window(schedule: ExpertScheduleConfig, epoch: int) -> tuple[float, float]:
    """``(start, stop)``: expert epoch ``epoch`` (0-based) trains on positions ``int(start * n)`` to
    ``int(stop * n)`` of each class's easy-to-hard order of ``n`` images (buffer_CL.py's phases)."""
    s = schedule
    if epoch <= s.add_end_epoch:
        return 0.0, linear_ratio(epoch, s.init_ratio, s.add_end_epoch)
    if epoch <= s.rm_epoch_first:
        return 0.0, 1.0
    if epoch <= s.rm_epoch_second:
        return s.rm_easy_ratio_first, 1.0
    return s.rm_easy_ratio_second, 1.0


def epoch_indices(order: DifficultyOrder, schedule: ExpertScheduleConfig, epoch: int) -> torch.Tensor:
    """The training indices of expert epoch ``epoch``, class by class (the loop shuffles them)."""
    start, stop = epoch_window(schedule, epoch)
    picked = torch.cat([run[int(start * len(run)) : int(stop * len(run))] for run in order.by_class()])
    if len(picked) == 0:
        raise ConfigError(
            f"experts.schedule leaves no training image at expert epoch {epoch} (window {start:g}..{stop:g})"
        )
    return picked


def save_order(work: Path, scores: torch.Tensor, order: DifficultyOrder) -> None:
    save_arrays(
        work / ORDER,
        {
            "scores": scores.detach().cpu().numpy().astype(np.float32),
            "indices": order.indices.cpu().numpy().astype(np.int64),
            "counts": np.asarray(order.counts, dtype=np.int64),
        },
    )


def load_order(store: Store, key: str, device: torch.device | str = "cpu") -> DifficultyOrder:
    """The stored order, its indices on ``device`` (where the data they index lives)."""
    arrays = load_arrays(store.path(STAGE, key) / ORDER, ["indices", "counts"])
    return DifficultyOrder(torch.from_numpy(arrays["indices"]).to(device), arrays["counts"].tolist())
