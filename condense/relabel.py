"""Relabeling for the KD recipe: the teacher's soft labels on every augmented student batch.

An epoch of KD training is an :class:`EpochPlan`: the order of the images (consecutive chunks are
the batches), each image's random-resized-crop box and flip, the patch permutation of stitched
images (RDED's ShufflePatches) and each batch's CutMix partner and box. The student sees
``plan_inputs`` and learns the teacher's probabilities on exactly those inputs.

*Online* (RDED) draws a plan per epoch and runs the teacher as it trains. *Stored* (FKD, SRe2L)
draws the plans once, runs the teacher once, and keeps plans and top-k probabilities in zarr, so a
student can be trained later, anywhere, without the teacher. Both paths build their inputs with the
same functions from the same (rounded) plan values, so replaying stored labels is exact.

Stored labels grow with images x epochs x kept classes (ImageNet-1K, IPC 50, 300 epochs, all
1,000 probabilities in float16: 30 GB), so storage has four knobs, each applied in both modes so
that online and stored students still train on the same labels:

- ``top_k``: keep the k largest probabilities, spread the rest uniformly (FKD's marginal smoothing).
  With all classes kept no class indices are stored: a full row is in class order, and its indices
  would be a permutation as large as float16 values that says nothing.
- ``fp16``: boxes and probabilities as float16.
- ``quantize: uint8``: the kept probabilities as 8-bit codes on a per-row grid (:func:`encode`).
- ``stored_epochs``: plans for that many epochs only, replayed cyclically (epoch e trains on stored
  epoch e mod stored_epochs): storage falls by epochs / stored_epochs, the students see fewer
  distinct augmentations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from condense import crops
from condense.config import KDRecipeConfig
from condense.devices import upload
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

    def to(self, device: torch.device) -> EpochPlan:
        """The plan with what the batches index on ``device``, copied once per epoch; the CutMix
        boxes stay on the host, which cuts the pixel ranges from them."""
        moved = {
            name: upload(getattr(self, name), device) for name in ("order", "boxes", "flips", "mix_partner")
        }
        perm = None if self.patch_perm is None else upload(self.patch_perm, device)
        return dataclasses.replace(self, **moved, patch_perm=perm)


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


def kept(probs: torch.Tensor, k: int | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What storage keeps of probability rows: (indices, values) of the top k, or (None, the rows in
    class order) when every class is kept, since then the indices carry nothing."""
    if k is None or k >= probs.shape[1]:
        return None, probs
    return top_k(probs, k)


Quantize = Literal["none", "uint8"]
CODE_MAX = 255


def encode(values: torch.Tensor, fp16: bool, quantize: Quantize) -> dict[str, torch.Tensor]:
    """Kept probabilities as stored: float16/32 ``prob``, or for ``uint8`` a per-row ``scale`` (the
    row's largest probability, float16/32) and ``code`` = round(255 * value / scale).

    Why a uniform grid, and why per row: the KD loss's gradient in the student's logits is
    (student probabilities - target probabilities) / T, so an error in a target moves the gradient by
    the same absolute amount, whatever the target's size; a uniform grid minimises the worst absolute
    error for its 256 levels (a log grid would spend them on the tail's relative precision, which the
    loss does not see). KD temperatures flatten rows (T = 20 divides the logits by 20): a fixed [0, 1]
    grid, step 1/255, would round a flat 1,000-class row (values near 0.001) to zeros; a grid from 0
    to the row's own maximum bounds the error by max / 510 (plus the scale's float16 rounding)."""
    if quantize == "none":
        return {"prob": _round(values, fp16)}
    scale = _round(values.amax(1), fp16)
    code = torch.round(values / scale[:, None] * CODE_MAX).clamp(0, CODE_MAX).to(torch.uint8)
    return {"scale": scale, "code": code}


def decode(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 probabilities from :func:`encode`'s columns (one function for both modes, so the
    online teacher's targets and replayed ones are the same floats)."""
    if "prob" in columns:
        return columns["prob"].float()
    return columns["code"].float() * (columns["scale"].float()[:, None] / CODE_MAX)


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


def targets_from(indices: torch.Tensor | None, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full probability rows from what :func:`kept` kept (and :func:`decode` gave back). Full rows are
    renormalised: rounding moves a row's sum (uint8: by up to classes x max / 510), and a target mass
    of 1 + e adds e x the student's probabilities to the KD gradient and T^2 x e to the loss."""
    if indices is None:
        return values / values.sum(1, keepdim=True)
    return expand_top_k(indices, values, num_classes)


def online_labels(
    teacher: nn.Module, temperature: float, k: int | None, fp16: bool, quantize: Quantize = "none"
) -> Targets:
    """The teacher on every batch, reduced like stored labels (top-k, float16, uint8) so both agree."""

    def targets(epoch: int, batch: int, inputs: torch.Tensor) -> torch.Tensor:
        probs = teacher_probs(teacher, inputs, temperature)
        indices, values = kept(probs, k)
        return targets_from(indices, decode(encode(values, fp16, quantize)), probs.shape[1])

    return targets


def online_plans(
    n: int, batch_size: int, aug: KDAugment, seed: int, fp16: bool, cycle: int | None = None
) -> Plans:
    """A fresh plan per epoch from one seeded stream (epochs must be requested in order); with
    ``cycle``, only the first ``cycle`` are drawn and epoch e reuses plan e mod cycle, as stored
    labels with ``stored_epochs`` do."""
    generator = torch.Generator().manual_seed(seed)
    drawn: list[EpochPlan] = []

    def plans(epoch: int) -> EpochPlan:
        if cycle is None:
            return sample_plan(n, batch_size, aug, generator, fp16)
        while len(drawn) <= epoch % cycle:
            drawn.append(sample_plan(n, batch_size, aug, generator, fp16))
        return drawn[epoch % cycle]

    return plans


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
    *,
    quantize: Quantize = "none",
    stored_epochs: int | None = None,
    shard: range | None = None,
) -> dict[str, np.ndarray]:
    """The plans and the teacher's kept probabilities of the first ``stored_epochs`` epochs (all
    ``epochs`` when None), as arrays to store: per epoch ``order``, ``boxes``, ``flips``,
    ``mix_partner``, ``mix_boxes`` (and ``patch_perm``), ``top_k_index`` unless every class is kept,
    and ``top_k_prob`` or, quantised, ``top_k_scale`` and ``top_k_code`` (see :func:`encode`).

    ``shard``: only these epochs (a job of a sharded relabeling). The plans of the epochs before it
    are drawn too (cheap: no teacher) so that the seeded stream reaches the shard's first epoch as in
    the whole run; the shards' arrays, joined along the epoch axis, are the whole run's."""
    n = len(images)
    count = stored_epoch_count(epochs, stored_epochs)
    wanted = shard if shard is not None else range(count)
    generator = torch.Generator().manual_seed(seed)
    float_type = np.float16 if fp16 else np.float32
    columns: dict[str, list[np.ndarray]] = {}
    for epoch in range(wanted.stop):
        plan = sample_plan(n, batch_size, aug, generator, fp16)
        if epoch < wanted.start:
            continue
        batches: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        for batch in range(num_batches(n, batch_size)):
            inputs = plan_inputs(images, plan, batch, batch_size, aug.factor)
            batches.append(kept(teacher_probs(teacher, inputs, temperature), k))
        row = {
            "order": plan.order.numpy().astype(np.int32),
            "boxes": plan.boxes.numpy().astype(float_type),
            "flips": plan.flips.numpy(),
            "mix_partner": plan.mix_partner.numpy().astype(np.int32),
            "mix_boxes": plan.mix_boxes.numpy().astype(float_type),
        }
        if batches[0][0] is not None:
            row["top_k_index"] = torch.cat([i for i, _ in batches]).cpu().numpy().astype(np.int16)
        encoded = encode(torch.cat([v for _, v in batches]), fp16, quantize)
        for name, value in encoded.items():
            row[f"top_k_{name}"] = value.cpu().numpy().astype(np.uint8 if name == "code" else float_type)
        if plan.patch_perm is not None:
            row["patch_perm"] = plan.patch_perm.numpy().astype(np.int8)
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
        progress.step(epoch + 1 - wanted.start, len(wanted), "relabel")
    return {name: np.stack(values) for name, values in columns.items()}


def stored_epoch_count(epochs: int, stored_epochs: int | None) -> int:
    """How many epochs of labels relabeling stores (its units when sharded)."""
    return min(stored_epochs or epochs, epochs)


class StoredLabels:
    """Replays stored relabeling: the epoch's plan and each batch's target probabilities. Training
    epoch e replays stored epoch e mod (the number stored), so ``stored_epochs`` cycles."""

    def __init__(self, arrays: dict[str, Any], num_classes: int, batch_size: int):
        self.arrays, self.num_classes, self.batch_size = arrays, num_classes, batch_size
        self.epochs = arrays["order"].shape[0]
        self._labels: tuple[int, torch.Tensor | None, torch.Tensor] | None = None
        """(stored epoch, kept indices or None, decoded probabilities): one read per epoch, not one
        per batch."""

    def plan(self, epoch: int) -> EpochPlan:
        epoch %= self.epochs
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
        epoch %= self.epochs
        if self._labels is None or self._labels[0] != epoch:

            def read(name: str) -> torch.Tensor:
                return torch.from_numpy(np.asarray(self.arrays[name][epoch]))

            columns = {
                name.removeprefix("top_k_"): read(name)
                for name in ("top_k_prob", "top_k_scale", "top_k_code")
                if name in self.arrays
            }
            indices = read("top_k_index") if "top_k_index" in self.arrays else None
            self._labels = (epoch, indices, decode(columns))
        _, indices, values = self._labels
        rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        return targets_from(None if indices is None else indices[rows], values[rows], self.num_classes)
