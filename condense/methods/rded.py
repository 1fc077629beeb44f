"""RDED: On the Diversity and Realism of Distilled Dataset (Sun et al., CVPR 2024).

Distillation without optimisation. Per class: sample ``candidates`` real images, cut
``crops_per_image`` random resized crops of side ``resolution / factor`` from each, score every crop
by the teacher's ("observer's") cross-entropy for the true class (zero-padded back to the teacher's
input size), keep each source image's best crop, then the ``ipc * factor^2`` best crops of the class,
and stitch ``factor x factor`` of them, in selection order, into each synthetic image. Factor 1 (no
stitching) is the paper's setting for 32 px data. Students then learn from the teacher's soft labels
under the KD recipe (``evaluate.recipe: kd``), which is what makes RDED's numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from condense import crops
from condense.config import Strict
from condense.errors import ConfigError, DatasetError
from condense.methods import Sharding, register_method
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.progress import SILENT, Progress
from condense.teacher import check_class_order
from condense.training import predict


class RDEDConfig(Strict):
    factor: int = Field(default=1, gt=0)
    """Patches per image side: factor^2 patches stitched per image (1 for 32 px data, 2 for ImageNet)."""
    candidates: int = Field(default=300, gt=0)
    """Real images sampled per class (the paper's ``mipc``); capped at the class size."""
    crops_per_image: int = Field(default=5, gt=0)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the candidate crops (aspect ratio fixed at 1, as in the paper's code)."""
    min_teacher_accuracy: float | None = Field(default=None, ge=0, le=100)
    """Class-order guard: the teacher's accuracy (%) on real training images must reach this;
    None: three times chance (at most 50)."""
    check_images_per_class: int = Field(default=50, gt=0)

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("crop_scale must be (low, high) with 0 < low <= high <= 1")
        return value


def check(cfg: Any) -> None:
    rded: RDEDConfig = cfg.distill
    needed = cfg.ipc * rded.factor**2
    if needed > rded.candidates:
        raise ValueError(
            f"RDED keeps one crop per candidate image: ipc * factor^2 = {needed} needs "
            f"distill.candidates >= {needed} (got {rded.candidates})"
        )
    if cfg.dataset.resolution is not None and cfg.dataset.resolution % rded.factor:
        raise ValueError(f"distill.factor {rded.factor} must divide the resolution {cfg.dataset.resolution}")


def score_crops(teacher: torch.nn.Module, patches: torch.Tensor, label: int, side: int) -> torch.Tensor:
    """Teacher cross-entropy of the true class for each patch, zero-padded (centred) to ``side``."""
    pad = side - patches.shape[-1]
    if pad:
        patches = F.pad(patches, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    logits = predict(teacher, patches, batch_size=512)
    return F.cross_entropy(logits, torch.full((len(patches),), label, device=logits.device), reduction="none")


def select_class(
    teacher: torch.nn.Module,
    images: torch.Tensor,
    label: int,
    ipc: int,
    cfg: RDEDConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RDED for one class: ``ipc`` stitched images from the teacher's most confident real crops."""
    side = images.shape[-1]
    patch_side = side // cfg.factor
    sources = images.repeat_interleave(cfg.crops_per_image, dim=0)
    boxes = crops.random_resized_boxes(len(sources), cfg.crop_scale, (1.0, 1.0), generator)
    patches = crops.crop_resize(sources, boxes, patch_side)
    scores = score_crops(teacher, patches, label, side).view(len(images), cfg.crops_per_image)
    best_score, best_crop = scores.min(dim=1)
    keep = best_score.argsort()[: ipc * cfg.factor**2]
    chosen = patches.view(len(images), cfg.crops_per_image, *patches.shape[1:])[keep, best_crop[keep]]
    stats = {
        "candidate_ce": float(scores.mean()),
        "selected_ce": float(best_score[keep].mean()),
    }
    return crops.stitch(chosen, cfg.factor), stats


def merge(inputs: DistillInputs, parts: list[SyntheticSet]) -> SyntheticSet:
    """The shards' classes, in class order, as one set; its statistics over every class."""
    cfg: RDEDConfig = inputs.method_cfg
    history = [record for part in parts for record in part.history]
    return SyntheticSet(
        images=torch.cat([part.images for part in parts]),
        labels=torch.cat([part.labels for part in parts]),
        history=history,
        stats={
            "factor": cfg.factor,
            "teacher_check_accuracy": parts[0].stats["teacher_check_accuracy"],
            "candidate_ce": round(sum(h["candidate_ce"] for h in history) / len(history), 4),
            "selected_ce": round(sum(h["selected_ce"] for h in history) / len(history), 4),
        },
    )


@register_method(
    "rded", config=RDEDConfig, needs=("teacher",), check=check, streams=True, shards=Sharding("class", merge)
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT) -> SyntheticSet:
    """The classes ``inputs.units`` (each with its own generator, so a shard picks what the whole
    run would); their images, labels and per-class history."""
    cfg: RDEDConfig = inputs.method_cfg
    data, teacher = inputs.data, inputs.teacher
    if teacher is None:
        raise ConfigError("RDED needs a teacher (the observer that scores candidate patches)")
    if data.resolution % cfg.factor:
        raise ConfigError(f"distill.factor {cfg.factor} must divide the image side {data.resolution}")
    generator = torch.Generator().manual_seed(inputs.seed)
    guard_accuracy = check_class_order(
        teacher, data, cfg.min_teacher_accuracy, cfg.check_images_per_class, generator
    )
    classes = inputs.units if inputs.units is not None else range(data.num_classes)
    state = checkpoints.load() or {"images": [], "history": []}
    if state["images"]:
        progress.note(f"resuming RDED after class {classes[len(state['images']) - 1]}")
    for label in classes[len(state["images"]) :]:
        # One generator per class: a resumed run or a shard draws exactly what the whole run would.
        class_gen = torch.Generator().manual_seed(inputs.seed * 100_003 + label)
        members = torch.nonzero(data.train_y == label).flatten()
        picked = members[torch.randperm(len(members), generator=class_gen)[: cfg.candidates]]
        if len(picked) < inputs.ipc * cfg.factor**2:
            raise DatasetError(
                f"class {label} has {len(picked)} training images; RDED needs ipc * factor^2 = "
                f"{inputs.ipc * cfg.factor**2}"
            )
        images, stats = select_class(teacher, data.images(picked), label, inputs.ipc, cfg, class_gen)
        state["images"].append(images)
        state["history"].append({"class": label, **stats})
        checkpoints.save(state)
        progress.step(
            len(state["images"]), len(classes), f"class {label}: selected CE {stats['selected_ce']:.3f}"
        )
    return SyntheticSet(
        # Restored classes come back on the CPU.
        images=torch.cat([images.cpu() for images in state["images"]]),
        labels=torch.tensor(list(classes)).repeat_interleave(inputs.ipc),
        history=state["history"],
        stats={"teacher_check_accuracy": round(guard_accuracy, 2)},
    )
