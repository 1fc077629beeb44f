"""CUDD: Curriculum Dataset Distillation (Ma, Cao, Yang, Gong & Wei, arXiv 2405.09150).

The IPC budget is split into successive curricula, each recovered with SRe2L's loop
(``condense.methods.sre2l``) plus two terms. Curriculum 1 starts from real images the teacher
classifies correctly ("simple"). Before each later curriculum a student is trained by KD (online
teacher) on the images distilled so far, and the curriculum starts from real images the teacher
gets right and the student gets wrong ("medium"; then both wrong, "hard"; then simple, when too
few). Its loss adds

- ``adv_weight`` * -log(1 - p_student(y | x)), masked to the images the teacher still classifies
  correctly: keep the image hard for the current student (diversity, cross-architecture
  robustness);
- ``l2_weight`` * MSE between the image and its initial real image, under the same crop and shift.

The recover loop is SRe2L's (:mod:`condense.methods.recover`); the two terms are passed to it as extra
terms (:func:`cudd_terms`). Each curriculum's student (weights and test accuracy), its initial
picks and every finished batch are checkpointed, so a run that stops resumes in the curriculum,
even in the batch, it was in.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from condense.config import KDRecipeConfig
from condense.errors import ConfigError
from condense.evaluate import KDRecipe, train_kd
from condense.methods import Sharding, register_method
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.methods.recover import (
    ExtraTerms,
    RecoverConfig,
    RecoverStep,
    batch_generator,
    check_teacher_settings,
    checked_teacher,
    class_major,
    frozen,
    pixel_bounds,
    recover_batch,
    saving_partial,
    summarize_recovery,
    with_batch,
)
from condense.models import CONVNET, build_model
from condense.prepare import RealData
from condense.progress import SILENT, Progress
from condense.relabel import KDAugment, online_labels, online_plans
from condense.training import indexed_logits, split_accuracy


class CUDDConfig(RecoverConfig):
    init: Literal["noise", "real"] = "real"
    """Curricula always start from selected real images."""
    curricula: list[int] | None = None
    """Images per class of each curriculum, summing to ipc; None: two halves (the first rounds up)."""
    adv_weight: float = Field(default=1.0, ge=0)
    l2_weight: float = Field(default=1.0, ge=0)
    student_epochs: int = Field(default=150, gt=0)
    """KD epochs of each curriculum's student (the paper: 150)."""
    student_batch_size: int = Field(default=50, gt=0)
    student: KDRecipeConfig = Field(default_factory=KDRecipeConfig)

    @model_validator(mode="after")
    def _real_init(self) -> CUDDConfig:
        if self.init != "real":
            raise ValueError("CUDD starts every curriculum from selected real images: init must be 'real'")
        return self


def curriculum_sizes(cfg: CUDDConfig, ipc: int) -> list[int]:
    return cfg.curricula or [s for s in ((ipc + 1) // 2, ipc // 2) if s > 0]


def adversarial_loss(
    student: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """CUDD's non-saturating term -log(1 - p_student(y|x)), averaged over the images the teacher
    still classifies correctly (the others get no push)."""
    p_true = torch.softmax(student(x), dim=1).gather(1, labels[:, None]).squeeze(1)
    mask = (teacher_logits.argmax(1) == labels).float()
    per_image = -torch.log((1 - p_true).clamp(min=1e-6))
    return (per_image * mask).sum() / mask.sum().clamp(min=1)


def cudd_terms(student: torch.nn.Module | None, anchor: torch.Tensor, cfg: CUDDConfig) -> ExtraTerms:
    """The two terms CUDD adds to recovery: stay near ``anchor`` (the start image) under the same
    augmentation, and, once a student exists, stay hard for it where the teacher is right."""

    def terms(step: RecoverStep) -> dict[str, tuple[float, torch.Tensor]]:
        out = {"l2": (cfg.l2_weight, F.mse_loss(step.x, step.augment(anchor)))}
        if student is not None:
            out["adv"] = (cfg.adv_weight, adversarial_loss(student, step.x, step.labels, step.logits))
        return out

    return terms


def check(cfg: Any) -> None:
    check_teacher_settings(cfg)
    sizes = curriculum_sizes(cfg.distill, cfg.ipc)
    if sum(sizes) != cfg.ipc or min(sizes) < 1:
        raise ValueError(f"distill.curricula {sizes} must be positive and sum to ipc={cfg.ipc}")


def select_initial(
    data: RealData,
    teacher_right: torch.Tensor,
    student_right: torch.Tensor | None,
    size: int,
    used: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, int]]:
    """(classes, size) indices of real training images to start a curriculum from, per CUDD's
    initialisation: medium (teacher right, student wrong), then hard (both wrong), then simple
    (teacher right), then anything unused; never an image an earlier curriculum started from."""
    counts = {"simple": 0, "medium": 0, "hard": 0, "other": 0}
    # Bookkeeping on the CPU, wherever the data and the networks are.
    train_y, teacher_right = data.train_y.cpu(), teacher_right.cpu()
    student_right = None if student_right is None else student_right.cpu()
    free = torch.ones(len(train_y), dtype=torch.bool)
    free[used] = False
    picks = []
    for c in range(data.num_classes):
        member = (train_y == c) & free
        if student_right is None:
            tiers = [("simple", member & teacher_right)]
        else:
            tiers = [
                ("medium", member & teacher_right & ~student_right),
                ("hard", member & ~teacher_right & ~student_right),
                ("simple", member & teacher_right),
            ]
        tiers.append(("other", member))
        chosen: list[int] = []
        for name, mask in tiers:
            pool = [i for i in torch.nonzero(mask).flatten().tolist() if i not in chosen]
            order = torch.randperm(len(pool), generator=generator).tolist()
            take = [pool[i] for i in order[: size - len(chosen)]]
            chosen += take
            counts[name] += len(take)
        if len(chosen) < size:
            raise ConfigError(f"class {c} has too few unused training images for a curriculum of {size}")
        picks.append(torch.tensor(chosen))
    return torch.stack(picks), counts


def train_student(
    inputs: DistillInputs, images: torch.Tensor, cfg: CUDDConfig, seed: int, progress: Progress
) -> torch.nn.Module:
    """KD student on the images so far, the teacher online (the relabel + KD recipe of the pipeline)."""
    kd = cfg.student
    recipe = KDRecipe(
        epochs=cfg.student_epochs,
        lr=kd.lr,
        weight_decay=kd.weight_decay,
        final_lr_fraction=kd.final_lr_fraction,
        batch_size=cfg.student_batch_size,
        temperature=kd.temperature,
        augment=KDAugment.from_config(kd),
    )
    plans = online_plans(len(images), recipe.batch_size, recipe.augment, seed, fp16=True)
    targets = online_labels(inputs.teacher, kd.temperature, None, fp16=True)
    model, _ = train_kd(
        CONVNET, inputs.data, images, recipe, seed, plans, targets, inputs.model_cfg, progress
    )
    return frozen(model)


def _student_model(inputs: DistillInputs, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    data = inputs.data
    model = build_model(CONVNET, data.channels, data.num_classes, data.resolution, inputs.model_cfg)
    model.load_state_dict(state_dict)
    model.to(data.device, non_blocking=True)
    return frozen(model)


def first_size(cfg: CUDDConfig, ipc: int) -> int:
    """Images per class of the first curriculum: the batches that shard (``compute.shards``)."""
    return curriculum_sizes(cfg, ipc)[0]


def curriculum_seed(seed: int, index: int) -> int:
    """Curriculum ``index``'s draws (its student's and its picks'), fixed by (seed, index) alone."""
    return seed * 7919 + index


def first_picks(
    inputs: DistillInputs, teacher: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(which training images the teacher gets right, the first curriculum's (classes, size) start
    images, their counts by tier): the same in every shard and in the merge job."""
    data = inputs.data
    teacher_right = indexed_logits(teacher, data).argmax(1) == data.train_y
    size = first_size(inputs.method_cfg, inputs.ipc)
    none_used = torch.zeros(0, dtype=torch.long)
    picks, counts = select_initial(
        data,
        teacher_right,
        None,
        size,
        none_used,
        torch.Generator().manual_seed(curriculum_seed(inputs.seed, 0)),
    )
    return teacher_right, picks, counts


def recover_anchored(
    inputs: DistillInputs,
    teacher: torch.nn.Module,
    student: torch.nn.Module | None,
    anchor_indices: torch.Tensor,
    number: int,
    state: dict[str, Any],
    checkpoints: Checkpoints,
    progress: Progress,
    label: str,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Batch ``number`` of the set (one image per class) recovered from the real images at
    ``anchor_indices`` with CUDD's terms, resumable from ``state``'s partial batch."""
    data = inputs.data
    anchor = data.images(anchor_indices)
    return recover_batch(
        teacher,
        anchor,
        torch.arange(data.num_classes, device=data.device),
        inputs.method_cfg,
        pixel_bounds(data),
        batch_generator(inputs.seed, number),
        saving_partial(checkpoints, state),
        resume=state["partial"],
        extra_terms=cudd_terms(student, anchor, inputs.method_cfg),
        progress=progress,
        label=label,
    )


def merge_first(inputs: DistillInputs, parts: list[SyntheticSet]) -> SyntheticSet:
    """The first curriculum's shards, their batches in IPC order (batch-major), with their history."""
    return SyntheticSet(
        images=torch.cat([part.images for part in parts]),
        labels=torch.cat([part.labels for part in parts]),
        history=[record for part in parts for record in part.history],
        stats=parts[0].stats,
    )


def later_curricula(
    inputs: DistillInputs, first: SyntheticSet, checkpoints: Checkpoints, progress: Progress
) -> SyntheticSet:
    """Curricula 2.. on top of the merged first one (each after a student of every image so far),
    then the whole set, class-major, with the recovery's statistics and each curriculum's record."""
    cfg: CUDDConfig = inputs.method_cfg
    data = inputs.data
    teacher = frozen(inputs.teacher)
    labels = torch.arange(data.num_classes, device=data.device)
    sizes = curriculum_sizes(cfg, inputs.ipc)
    teacher_right, picks, counts = first_picks(inputs, teacher)
    state = checkpoints.load()
    if state is None or "curriculum" not in state:  # none yet, or the whole run's first curriculum's
        histories: list[list[dict[str, float]]] = [[] for _ in range(sizes[0])]
        for record in first.history:
            histories[record["batch"]].append({k: v for k, v in record.items() if k != "batch"})
        state = {
            "batches": list(first.images.split(data.num_classes)),
            "histories": histories,
            "partial": None,
            "curriculum": 0,
            "curricula": [{"curriculum": 1, "size": sizes[0], "init": counts, "picks": picks}],
            "used": picks.flatten(),
        }
    elif len(sizes) > 1:
        progress.note(f"resuming CUDD in curriculum {state['curriculum'] + 1}/{len(sizes)}")
    first_index = sizes[0]
    for index, size in enumerate(sizes[1:], start=1):
        if len(state["batches"]) >= first_index + size:
            first_index += size
            continue
        if state["curriculum"] != index:
            progress.note(
                f"CUDD curriculum {index + 1}: training a student on {first_index} images per class"
            )
            seed = curriculum_seed(inputs.seed, index)
            student = train_student(inputs, class_major(state["batches"], data.device), cfg, seed, progress)
            student_right = indexed_logits(student, data).argmax(1) == data.train_y
            generator = torch.Generator().manual_seed(seed)
            picks, counts = select_initial(data, teacher_right, student_right, size, state["used"], generator)
            record = {
                "curriculum": index + 1,
                "size": size,
                "student_accuracy": round(split_accuracy(student, data), 2),
                "student": student.state_dict(),
                "init": counts,
                "picks": picks,
            }
            state = {
                **state,
                "curriculum": index,
                "curricula": [*state["curricula"], record],
                "used": torch.cat([state["used"], picks.flatten()]),
            }
            checkpoints.save(state)
        else:
            student = _student_model(inputs, state["curricula"][index]["student"])
        picks = state["curricula"][index]["picks"]
        for offset in range(len(state["batches"]) - first_index, size):
            images, history = recover_anchored(
                inputs,
                teacher,
                student,
                picks[:, offset],
                first_index + offset,
                state,
                checkpoints,
                progress,
                f"curriculum {index + 1} batch {offset + 1}/{size}",
            )
            state = with_batch(state, images, history)
            checkpoints.save(state)
        first_index += size
    images = class_major(state["batches"], data.device)
    out_labels = labels.repeat_interleave(inputs.ipc)
    curricula = [
        {k: v for k, v in record.items() if k not in ("student", "picks")} for record in state["curricula"]
    ]
    stats: dict[str, Any] = {
        "teacher_check_accuracy": first.stats["teacher_check_accuracy"],
        **summarize_recovery(teacher, images, out_labels, state["histories"]),
        "curricula": curricula,
    }
    return SyntheticSet(
        images=images,
        labels=out_labels,
        history=[{"batch": b, **r} for b, h in enumerate(state["histories"]) for r in h],
        stats=stats,
    )


@register_method(
    "cudd",
    config=CUDDConfig,
    needs=("teacher",),
    check=check,
    streams=True,
    shards=Sharding("ipc", merge_first, prefix=first_size, finish=later_curricula),
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT) -> SyntheticSet:
    """The first curriculum's batches ``inputs.units`` (IPC indices), each recovered from its start
    image with its own generator, so a shard recovers what the whole run would; batch-major, with
    their history. The later curricula follow in :func:`later_curricula` (the merge job's)."""
    cfg: CUDDConfig = inputs.method_cfg
    data = inputs.data
    teacher, guard = checked_teacher(inputs)
    _, picks, _ = first_picks(inputs, teacher)
    size = first_size(cfg, inputs.ipc)
    numbers = inputs.units if inputs.units is not None else range(size)
    state = checkpoints.load() or {"batches": [], "histories": [], "partial": None}
    if (state["batches"] or state["partial"]) and len(state["batches"]) < len(numbers):
        progress.note(
            f"resuming CUDD's first curriculum with {len(state['batches'])} of {len(numbers)} batches done"
        )
    # A whole run killed in a later curriculum left its state here: its batches start with these.
    for number in numbers[len(state["batches"]) :]:
        images, history = recover_anchored(
            inputs,
            teacher,
            None,
            picks[:, number],
            number,
            state,
            checkpoints,
            progress,
            f"curriculum 1 batch {number + 1}/{size}",
        )
        state = with_batch(state, images, history)
        checkpoints.save(state)
    batches, histories = state["batches"][: len(numbers)], state["histories"][: len(numbers)]
    return SyntheticSet(
        images=torch.cat([batch.to(data.device) for batch in batches]),
        labels=torch.arange(data.num_classes, device=data.device).repeat(len(batches)),
        history=[{"batch": b, **r} for b, h in zip(numbers, histories, strict=True) for r in h],
        stats={"teacher_check_accuracy": round(guard, 2)},
    )
