"""INFER: Breaking Class Barriers, dataset distillation via inter-class feature compensators (Zhang,
Du, Liu & Zhou, ICLR 2025; official code zhangxin-xd/UFC, ``ufc_generation/ufc_cifar.py``).

Instead of one image per class, INFER keeps real images and learns perturbations shared by all
classes: the "universal feature compensators" (UFCs). With M teachers of different architectures
(the pipeline's teacher and ``teacher.ensemble``: :class:`condense.artifacts.Ensemble`) and C classes:

1. K = ``real_per_class`` real training images per class, drawn at random (the paper's ipc_init;
   by default floor(ipc * C / (C + M)), so the K * C real images and the K * M compensators together
   fill the IPC budget of ipc * C images);
2. for each teacher m and each k < K, one perturbation u_{m,k} of one image's shape, zero at first,
   shared by the batch {x_{c,k} : c < C} (one real image of every class): for ``iterations`` steps,
   shift x_{c,k} + u_{m,k} by one random roll (``jitter``) for the whole batch, and minimise

       CE(teacher_m(x + u), c) + r_bn * sum_l s_l (||mu_l - mu_l^running||_2 + ||var_l - var_l^running||_2)

   over u alone, the BN statistics taken in teacher m (s_1 = ``first_bn_multiplier``); Adam (betas
   0.5/0.9), learning rate cosine to 0. This is SRe2L's recover loop
   (:func:`condense.methods.recover.recover_batch`) with the images rendered from the perturbation;
3. the student trains on {x_{c,k}} and {clip(x_{c,k} + u_{m,k})}: K * (M + 1) images per class, the
   teachers cycled over as in the official code (each teacher makes the compensators of its turn).

Labels: every reader of the teacher (the soft-labels stage, the KD recipe, stored relabeling) gets
the ensemble, the mean of the M teachers' logits. So the static labels of the paper (one soft label
per image: softmax of the mean logits at T) are the soft-labels stage's, exported with the set and
trained on by ``evaluate.recipe: mtt`` with ``evaluate.labels: soft``; INFER+Dyn's labels (the
ensemble on every augmented batch) are the KD recipe's, online or stored (``relabel.mode: stored``).

Storage: the set keeps the real images' indices in the prepared training split (``real_indices``,
(C, K)) and the compensators (``compensators``, (M * K, channels, H, W), float32) beside the images
the student sees (``images``, materialised, so evaluation, export and ``load_distilled`` read it as
any set). ``stats["storage"]`` says what it costs: stored images (K * C real + M * K compensators),
their bytes, the static labels' bytes, and the K * (M + 1) * C images the student trains on.

Deviations, on purpose:

- The jitter is a roll by -jitter..jitter pixels per axis (the recover loop's); the official code
  rolls by 0..jitter. Its roll is circular, so the two differ only in the draw's range.
- At an IPC below 1 + M / C the paper's rule gives no real image per class; K is then 1, and the set
  stores M images' worth more than IPC * C (``stats["storage"]`` shows it).
- K is computed in integers (floor(ipc * C / (C + M))); the official float expression agrees except
  where it rounds an exact quotient down.
- The clip to the pixel range applies to the materialised images (as the official saved images),
  not to the perturbation, which the loss sees unclipped as in the official loop.
- One compensator is shared by all C classes; the official script optimises the classes in chunks
  of ``--batch-size`` (all of them in its CIFAR and ImageNet commands).
- Not shardable: the number of compensators depends on the teacher ensemble's size, which the
  method's config, from which shards are counted, does not hold.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from condense.artifacts import teacher_members
from condense.datasets.common import sample_per_class
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.methods.recover import (
    RecoverConfig,
    batch_generator,
    check_teacher_settings,
    checked_teacher,
    pixel_bounds,
    recover_batch,
    saving_partial,
    summarize_recovery,
    with_batch,
)
from condense.prepare import RealData
from condense.progress import SILENT, Progress


class INFERConfig(RecoverConfig):
    """The official CIFAR command (``sh/ufc_cifar.sh``): 1,000 iterations, lr 0.25, r_bn 1, first BN
    layer x10, roll jitter 4, no crops or flips."""

    iterations: int = Field(default=1000, ge=0)
    """Steps per compensator; 0 leaves every compensator at zero (the real images alone, repeated)."""
    r_bn: float = Field(default=1.0, ge=0)
    init: Literal["real"] = "real"
    """Compensators perturb real images; nothing starts from noise."""
    crop: bool = False
    flip: bool = False
    real_per_class: int | None = Field(default=None, gt=0)
    """K, real images per class (the paper's ipc_init); None: floor(ipc * C / (C + M)), at least 1."""


def real_per_class(cfg: INFERConfig, ipc: int, teachers: int, classes: int) -> int:
    """K: real images per class, so that K * C real images and K * M compensators fill ipc * C."""
    if cfg.real_per_class is not None:
        return cfg.real_per_class
    return max(1, ipc * classes // (classes + teachers))


def compensated(
    real: torch.Tensor, compensators: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """What the student sees, class-major: for each class its K real images (``real``, (C, K, ...)),
    then each of them plus each teacher's compensator of its group (``compensators``, (M, K, ...)),
    clipped to the pixel range: (C * K * (M + 1), ...)."""
    low, high = bounds
    classes = real.shape[0]
    perturbed = torch.maximum(torch.minimum(real[:, None] + compensators[None], high), low)
    together = torch.cat([real, perturbed.reshape(classes, -1, *real.shape[2:])], dim=1)
    return together.reshape(-1, *real.shape[2:])


def storage(data: RealData, real: int, compensators: int, training: int) -> dict[str, int]:
    """What the set costs: images stored (real ones, and one per compensator) and their bytes (real
    images as exported, one byte per pixel and channel; compensators as kept, float32), the static
    labels' bytes (one float32 row per training image) and the images the student trains on."""
    pixels = data.channels * data.resolution**2
    real_bytes, compensator_bytes = real * pixels, compensators * pixels * 4
    return {
        "stored_images": real + compensators,
        "training_images": training,
        "image_bytes": real_bytes + compensator_bytes,
        "real_image_bytes": real_bytes,
        "compensator_bytes": compensator_bytes,
        "static_label_bytes": training * data.num_classes * 4,
    }


@register_method(
    "infer",
    config=INFERConfig,
    needs=("teacher",),
    check=check_teacher_settings,
    streams=True,
    shards="the number of its compensators depends on the teacher ensemble's size, not on its config",
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT) -> SyntheticSet:
    cfg: INFERConfig = inputs.method_cfg
    data = inputs.data
    teacher, guard = checked_teacher(inputs)
    members = teacher_members(teacher)
    teachers, classes = len(members), data.num_classes
    k = real_per_class(cfg, inputs.ipc, teachers, classes)
    labels = torch.arange(classes, device=data.device)
    picks = sample_per_class(data.train_y.cpu(), classes, k, torch.Generator().manual_seed(inputs.seed))
    drawn = data.images(picks)
    real = drawn.reshape(classes, k, *drawn.shape[1:])
    bounds = pixel_bounds(data)
    count = teachers * k
    state = checkpoints.load() or {"batches": [], "histories": [], "partial": None}
    if state["batches"] or state["partial"]:
        progress.note(f"resuming INFER with {len(state['batches'])} of {count} compensators done")
    for number in range(len(state["batches"]), count):
        member, group = divmod(number, k)  # teacher by teacher, as the official code cycles them
        batch = real[:, group]
        compensator, history = recover_batch(
            members[member],
            torch.zeros_like(batch[:1]),
            labels,
            cfg,
            bounds,
            batch_generator(inputs.seed, k + number),  # the official ipc_id of this compensator
            saving_partial(checkpoints, state),
            resume=state["partial"],
            progress=progress,
            label=f"compensator {number + 1}/{count} (teacher {member + 1}, real images {group + 1})",
            render=lambda u, batch=batch: batch + u,
        )
        state = with_batch(state, compensator, history)
        checkpoints.save(state)
    found = torch.cat([c.to(data.device) for c in state["batches"]])
    images = compensated(real, found.reshape(teachers, k, *real.shape[2:]), bounds)
    out_labels = labels.repeat_interleave(k * (teachers + 1))
    # Without a step there is no loss to summarise.
    recovered = summarize_recovery(teacher, images, out_labels, state["histories"]) if cfg.iterations else {}
    return SyntheticSet(
        images=images,
        labels=out_labels,
        history=[
            {"batch": b, "teacher": b // k, "group": b % k, **r}
            for b, h in enumerate(state["histories"])
            for r in h
        ],
        stats={
            "teacher_check_accuracy": round(guard, 2),
            **recovered,
            "teachers": teachers,
            "real_per_class": k,
            "compensators": count,
            "storage": storage(data, k * classes, count, len(images)),
        },
        arrays={"real_indices": picks.reshape(classes, k), "compensators": found},
    )
