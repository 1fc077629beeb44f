"""Relabeling for the KD recipe: the teacher's soft labels on every augmented student batch.

An epoch of KD training is an :class:`EpochPlan`: the order of the images (consecutive chunks are
the batches), each image's random-resized-crop box and flip, the patch permutation of stitched
images (RDED's ShufflePatches) and each batch's CutMix partner and box. The student sees
``plan_inputs`` and learns the teacher's probabilities on exactly those inputs.

*Online* (RDED) draws a plan per epoch and runs the teacher as it trains. *Stored* (FKD, SRe2L)
draws the plans once, runs the teacher once, and keeps plans and top-k probabilities in zarr, so a
student can be trained later, anywhere, without the teacher. Both paths build their inputs with the
same functions from the same (rounded) plan values, so replaying stored labels is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from condense import crops
from condense.config import KDRecipeConfig
from condense.progress import SILENT, Progress
from condense.training import predict


@dataclass(frozen=True)
class KDAugment:
    """The KD recipe's augmentation, resolved for one set (its stitching ``factor``)."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    cutmix_beta: float
    cutmix_prob: float
    factor: int = 1

    @classmethod
    def from_config(cls, kd: KDRecipeConfig, factor: int = 1) -> KDAugment:
        return cls(
            crop_scale=kd.crop_scale or (1 / factor, 1.0),
            crop_ratio=kd.crop_ratio,
            flip=kd.flip,
            cutmix_beta=kd.cutmix_beta,
            cutmix_prob=kd.cutmix_prob,
            factor=factor,
        )


@dataclass
class EpochPlan:
    order: torch.Tensor
    """(n,) image indices; batch b is ``order[b * batch_size:(b + 1) * batch_size]``."""
    boxes: torch.Tensor
    """(n, 4) crop box of the image at each position, fractions (top, left, height, width)."""
    flips: torch.Tensor
    """(n,) bool, per position."""
    mix_partner: torch.Tensor
    """(n,) position within its batch of the image whose CutMix box is pasted in."""
    mix_boxes: torch.Tensor
    """(batches, 4) one CutMix box per batch; an empty box means no mixing."""
    patch_perm: torch.Tensor | None = None
    """(n, factor^2) patch permutation per position, for stitched images."""


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _round(t: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Round to what storage keeps, so online and stored runs see identical inputs."""
    return t.half().float() if fp16 else t


def sample_plan(
    n: int, batch_size: int, aug: KDAugment, generator: torch.Generator, fp16: bool = True
) -> EpochPlan:
    boxes = crops.random_resized_boxes(n, aug.crop_scale, aug.crop_ratio, generator)
    flips = torch.rand(n, generator=generator) < 0.5 if aug.flip else torch.zeros(n, dtype=torch.bool)
    order = torch.randperm(n, generator=generator)
    partner = torch.cat(
        [torch.randperm(len(chunk), generator=generator) for chunk in torch.split(order, batch_size)]
    )
    mix_boxes = crops.cutmix_boxes(num_batches(n, batch_size), aug.cutmix_beta, aug.cutmix_prob, generator)
    patch_perm = None
    if aug.factor > 1:
        cells = aug.factor**2
        patch_perm = torch.argsort(torch.rand(n, cells, generator=generator), dim=1)
    return EpochPlan(order, _round(boxes, fp16), flips, partner, _round(mix_boxes, fp16), patch_perm)


def plan_inputs(x: torch.Tensor, plan: EpochPlan, batch: int, batch_size: int, factor: int) -> torch.Tensor:
    """Batch ``batch`` of the epoch: shuffle patches, crop-resize-flip, CutMix."""
    rows = slice(batch * batch_size, (batch + 1) * batch_size)
    images = x[plan.order[rows]]
    if plan.patch_perm is not None:
        images = crops.shuffle_patches(images, plan.patch_perm[rows], factor)
    images = crops.crop_resize(images, plan.boxes[rows], x.shape[-1], plan.flips[rows])
    return crops.cutmix(images, plan.mix_partner[rows], plan.mix_boxes[batch])


def top_k(probs: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest probabilities per row and their class indices (all classes when k is None)."""
    values, indices = probs.topk(k or probs.shape[1], dim=1)
    return indices, values


def expand_top_k(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full probability rows from top-k: the missing mass spread uniformly over the other classes."""
    k = indices.shape[1]
    values = values.float()
    rest = (1 - values.sum(1, keepdim=True)).clamp(min=0)
    probs = (rest / max(num_classes - k, 1)).expand(-1, num_classes).clone()
    probs.scatter_(1, indices.long(), values)
    return probs


def teacher_probs(teacher: nn.Module, inputs: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(predict(teacher, inputs) / temperature, dim=1)


Targets = Callable[[int, int, torch.Tensor], torch.Tensor]
"""(epoch, batch, inputs) -> target probability rows for that batch."""
Plans = Callable[[int], EpochPlan]


def online_labels(teacher: nn.Module, temperature: float, k: int | None, fp16: bool) -> Targets:
    """The teacher on every batch, quantised like stored labels (top-k, float16) so both agree."""

    def targets(epoch: int, batch: int, inputs: torch.Tensor) -> torch.Tensor:
        probs = teacher_probs(teacher, inputs, temperature)
        indices, values = top_k(probs, k)
        return expand_top_k(indices, _round(values, fp16), probs.shape[1])

    return targets


def online_plans(n: int, batch_size: int, aug: KDAugment, seed: int, fp16: bool) -> Plans:
    """A fresh plan per epoch from one seeded stream (epochs must be requested in order)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda epoch: sample_plan(n, batch_size, aug, generator, fp16)


# ----------------------------------------------------------------------------- stored (FKD)


def relabel(
    teacher: nn.Module,
    images: torch.Tensor,
    aug: KDAugment,
    epochs: int,
    batch_size: int,
    temperature: float,
    k: int | None,
    fp16: bool,
    seed: int,
    progress: Progress = SILENT,
) -> dict[str, np.ndarray]:
    """Every epoch's plan and the teacher's top-k probabilities, as arrays to store."""
    n = len(images)
    generator = torch.Generator().manual_seed(seed)
    float_type = np.float16 if fp16 else np.float32
    columns: dict[str, list[np.ndarray]] = {}
    for epoch in range(epochs):
        plan = sample_plan(n, batch_size, aug, generator, fp16)
        indices, values = [], []
        for batch in range(num_batches(n, batch_size)):
            inputs = plan_inputs(images, plan, batch, batch_size, aug.factor)
            i, v = top_k(teacher_probs(teacher, inputs, temperature), k)
            indices.append(i)
            values.append(v)
        row = {
            "order": plan.order.numpy().astype(np.int32),
            "boxes": plan.boxes.numpy().astype(float_type),
            "flips": plan.flips.numpy(),
            "mix_partner": plan.mix_partner.numpy().astype(np.int32),
            "mix_boxes": plan.mix_boxes.numpy().astype(float_type),
            "top_k_index": torch.cat(indices).cpu().numpy().astype(np.int16),
            "top_k_prob": torch.cat(values).cpu().numpy().astype(float_type),
        }
        if plan.patch_perm is not None:
            row["patch_perm"] = plan.patch_perm.numpy().astype(np.int8)
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
        progress.step(epoch + 1, epochs, "relabel")
    return {name: np.stack(values) for name, values in columns.items()}


class StoredLabels:
    """Replays stored relabeling: the epoch's plan and each batch's target probabilities."""

    def __init__(self, arrays: dict[str, Any], num_classes: int, batch_size: int):
        self.arrays, self.num_classes, self.batch_size = arrays, num_classes, batch_size
        self.epochs = arrays["order"].shape[0]
        self._labels: tuple[int, torch.Tensor, torch.Tensor] | None = None
        """(epoch, top-k indices, top-k probabilities): one read per epoch, not one per batch."""

    def plan(self, epoch: int) -> EpochPlan:
        a = {
            name: torch.from_numpy(np.asarray(arr[epoch]))
            for name, arr in self.arrays.items()
            if not name.startswith("top_k")
        }
        return EpochPlan(
            order=a["order"].long(),
            boxes=a["boxes"].float(),
            flips=a["flips"].bool(),
            mix_partner=a["mix_partner"].long(),
            mix_boxes=a["mix_boxes"].float(),
            patch_perm=a["patch_perm"].long() if "patch_perm" in a else None,
        )

    def targets(self, epoch: int, batch: int, inputs: torch.Tensor) -> torch.Tensor:
        if self._labels is None or self._labels[0] != epoch:
            self._labels = (
                epoch,
                torch.from_numpy(np.asarray(self.arrays["top_k_index"][epoch])),
                torch.from_numpy(np.asarray(self.arrays["top_k_prob"][epoch])),
            )
        rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        return expand_top_k(self._labels[1][rows], self._labels[2][rows], self.num_classes)
