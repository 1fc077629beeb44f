"""The recover loop of SRe2L (Yin, Xing & Shen, NeurIPS 2023), shared by SRe2L, CDA, CUDD and INFER:
CDA's crop-scale curriculum is an option of it, CUDD's adversarial and anchor terms are extra loss
terms passed in (:data:`ExtraTerms`), INFER's perturbation shared by a batch of real images is what it
renders the images from (``render``), none of them branches of it. The methods themselves are thin
files in ``condense.methods`` (``sre2l``, ``cda``, ``cudd``, ``infer``).

Recover optimises images against a frozen batch-norm teacher. Each step augments the whole batch
with one random resized crop, one flip and one random shift (torchvision applies a single draw to a
4-D batch, and SRe2L/CDA/CUDD inherit that), runs the teacher in eval mode and minimises

    CE(teacher(x), y) + r_bn * sum_l s_l (||mu_l(x) - mu_l^running||_2 + ||var_l(x) - var_l^running||_2)

where mu_l, var_l are the per-channel batch mean and biased variance of the input of BN layer l
(forward hooks) and s_1 = ``first_bn_multiplier``, the others 1. Adam (betas 0.5/0.9) with a cosine
learning rate to 0; pixels are clipped to the valid range after every step. Images are optimised one
IPC index at a time: a batch holds one image per class, as in the official code.

CDA only changes the crop: its minimum area scale follows a curriculum from 1.0 (whole image, easy)
down to ``crop_min_scale`` (local, hard), by step, linear or cosine schedule over the first
``milestone`` fraction of the iterations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from condense import crops
from condense.config import Strict
from condense.errors import ConfigError
from condense.methods import Sharding
from condense.methods.base import Checkpoints, DistillInputs, Resumable, ResumableLoop, SyntheticSet
from condense.prepare import RealData
from condense.progress import SILENT, Progress
from condense.teacher import check_class_order
from condense.training import cosine_factor, predict


class RecoverConfig(Strict):
    """SRe2L recover. Defaults for 32 px data follow SRe2L's CIFAR script (lr 0.25, r_bn 0.01) with
    CPU-sized iterations (the paper: 1K for CIFAR, 4K for ImageNet) and a jitter scaled to 32 px."""

    iterations: int = Field(default=1000, gt=0)
    """Steps per batch (one image per class)."""
    lr: float = Field(default=0.25, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)
    r_bn: float = Field(default=0.01, ge=0)
    first_bn_multiplier: float = Field(default=10.0, ge=0)
    init: Literal["noise", "real"] = "noise"
    """``noise``: N(0, 1) in the normalised input space (SRe2L); ``real``: random real images."""
    crop: bool = True
    """Random resized crop each step (SRe2L's multi-crop optimisation)."""
    crop_min_scale: float = Field(default=0.08, gt=0, le=1)
    crop_curriculum: Literal["none", "step", "linear", "cosine"] = "none"
    """CDA: ``none`` keeps the minimum scale at ``crop_min_scale`` throughout (SRe2L)."""
    milestone: float = Field(default=1.0, gt=0, le=1)
    """Fraction of the iterations over which the curriculum moves from 1.0 to ``crop_min_scale``."""
    flip: bool = True
    jitter: int = Field(default=4, ge=0)
    """Random shift (roll) of up to this many pixels per axis (SRe2L: 32 at 224 px)."""
    checkpoint_every: int = Field(default=100, gt=0)
    min_teacher_accuracy: float | None = Field(default=None, ge=0, le=100)
    """Class-order guard on the teacher (see RDED); None: three times chance."""
    check_images_per_class: int = Field(default=50, gt=0)


def check_teacher_settings(cfg: Any) -> None:
    """Recover needs batch-norm statistics and a valid pixel range to clip to."""
    teacher = cfg.teacher
    norm = cfg.model.norm if teacher.source == "best_expert" else teacher.norm
    if (teacher.arch == "convnet" and norm != "batchnorm") or (
        "convnet" in teacher.ensemble and teacher.norm != "batchnorm"
    ):
        raise ValueError(
            f"{cfg.method} matches batch-norm statistics: use a batch-norm teacher "
            "(teacher.source=train with teacher.norm=batchnorm, or a timm ResNet)"
        )
    if cfg.dataset.zca:
        raise ValueError(f"{cfg.method} clips pixels to the normalised range: dataset.zca must be false")


def crop_min_scale(iteration: int, iterations: int, cfg: RecoverConfig) -> float:
    """CDA's schedule of the crop's minimum area scale, from 1.0 down to ``cfg.crop_min_scale``."""
    floor = cfg.crop_min_scale
    if cfg.crop_curriculum == "none":
        return floor
    progress = min(1.0, iteration / (cfg.milestone * iterations))
    if cfg.crop_curriculum == "step":
        return 1.0 if progress < 1.0 else floor
    if cfg.crop_curriculum == "linear":
        return floor + (1 - floor) * (1 - progress)
    return cosine_factor(progress, 1.0, floor)


class BNStatistics:
    """Forward hooks on every BatchNorm2d of a network: the SRe2L statistics loss of the last forward."""

    def __init__(self, model: nn.Module, first_multiplier: float):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ConfigError("the teacher has no batch-norm layers: recover needs their running statistics")
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.terms: list[torch.Tensor] = []

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        running_mean, running_var = module.running_mean, module.running_var
        assert running_mean is not None and running_var is not None
        self.terms.append(torch.norm(running_mean - mean, 2) + torch.norm(running_var - var, 2))

    @contextmanager
    def hooked(self) -> Iterator[BNStatistics]:
        handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def loss(self) -> torch.Tensor:
        """Weighted sum over layers of the last forward's terms (then cleared)."""
        total = sum(w * t for w, t in zip(self.weights, self.terms, strict=True))
        self.terms = []
        return total  # type: ignore[return-value]


def pixel_bounds(data: RealData) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised values of pixel 0 and pixel 1 per channel, shaped (1, C, 1, 1), on the data's device."""
    device = data.device
    mean = torch.tensor(data.card["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.card["std"], device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@dataclass
class RecoverStep:
    """What extra loss terms see of one step: the augmented images, the teacher's logits, the
    labels, and the step's augmentation (to apply the same crop, flip and shift to another tensor)."""

    x: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    augment: Callable[[torch.Tensor], torch.Tensor]


ExtraTerms = Callable[[RecoverStep], dict[str, tuple[float, torch.Tensor]]]
"""name -> (weight, value): the loop adds weight * value to the loss and records the value."""


def augment_batch(
    x: torch.Tensor, box: torch.Tensor, flip: bool, shift: tuple[int, int], size: int
) -> torch.Tensor:
    """One crop box, flip and roll for the whole batch (as torchvision on a 4-D tensor)."""
    flips = torch.full((len(x),), flip)
    out = crops.crop_resize(x, box.expand(len(x), 4), size, flips)
    return torch.roll(out, shifts=shift, dims=(2, 3))


def recover_batch(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: RecoverConfig,
    bounds: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    checkpoint: Any,
    resume: dict[str, Any] | None = None,
    extra_terms: ExtraTerms | None = None,
    progress: Progress = SILENT,
    label: str = "recover",
    render: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Optimise one batch of images against the teacher; ``checkpoint(snapshot)`` every
    ``cfg.checkpoint_every`` steps, and ``resume`` (such a snapshot) continues exactly.

    ``render``: what is optimised (``images``, returned) is not the images but a parameter they are
    made of, ``render(parameter)`` (INFER's perturbation shared by a batch of real images), left
    unclipped; None: the images themselves, clipped to the pixel range after every step."""
    bn = BNStatistics(teacher, cfg.first_bn_multiplier)
    images = images.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=cfg.lr, betas=cfg.betas)
    resumable = Resumable({"images": images}, {"optimizer": optimizer}, generator)
    loop = ResumableLoop(
        label, cfg.iterations, cfg.checkpoint_every, checkpoint, resumable, "lower distill.lr"
    )
    start, history = loop.resume(resume, progress)
    side = images.shape[-1]
    low, high = bounds
    for it in range(start, cfg.iterations):
        for group in optimizer.param_groups:  # cosine to 0
            group["lr"] = cfg.lr * cosine_factor(it, cfg.iterations)
        scale = crop_min_scale(it, cfg.iterations, cfg)
        draws = torch.rand(3, generator=generator)
        box = (
            crops.random_resized_boxes(1, (scale, 1.0), (3 / 4, 4 / 3), generator)
            if cfg.crop
            else torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        )
        flip = cfg.flip and bool(draws[0] < 0.5)
        shift = (
            int(draws[1] * (2 * cfg.jitter + 1)) - cfg.jitter,
            int(draws[2] * (2 * cfg.jitter + 1)) - cfg.jitter,
        )

        def augment(t: torch.Tensor, box=box, flip=flip, shift=shift) -> torch.Tensor:
            return augment_batch(t, box, flip, shift, side)

        x = augment(images if render is None else render(images))
        with bn.hooked():
            logits = teacher(x)
        ce = F.cross_entropy(logits, labels)
        bn_loss = bn.loss()
        loss = ce + cfg.r_bn * bn_loss
        terms = {"ce": ce, "bn": bn_loss}
        if extra_terms is not None:
            for name, (weight, value) in extra_terms(RecoverStep(x, logits, labels, augment)).items():
                loss = loss + weight * value
                terms[name] = value
        terms["loss"] = loss
        # The step's one read from the device: every recorded term at once.
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
        read = dict(zip(terms, values, strict=True))
        record = {"it": it + 1, "ce": read.pop("ce"), "bn": read.pop("bn"), "crop_min_scale": scale, **read}
        loop.check(it, record["loss"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if render is None:
            with torch.no_grad():
                images.copy_(torch.maximum(torch.minimum(images, high), low))
        history.append(record)
        progress.step(it + 1, cfg.iterations, f"{label} ce {record['ce']:.3f} bn {record['bn']:.3f}")
        loop.checkpoint(it, history)
    return images.detach(), history


def random_real(data: RealData, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random real training image per entry of ``labels``."""
    picks = []
    for c in labels.tolist():
        members = torch.nonzero(data.train_y == c).flatten()
        picks.append(members[int(torch.randint(len(members), (1,), generator=generator))])
    return data.images(torch.stack(picks)).clone()


def initial_batch(
    data: RealData, labels: torch.Tensor, init: str, generator: torch.Generator
) -> torch.Tensor:
    if init == "real":
        return random_real(data, labels, generator)
    shape = (len(labels), data.channels, data.resolution, data.resolution)
    return torch.randn(*shape, generator=generator).to(data.device)


def summarize_recovery(
    teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, histories: list[list[dict[str, float]]]
) -> dict[str, float]:
    """What says whether recovery worked: does the teacher recognise the final images, and where did
    the losses end (mean over the last 5% of the steps of every batch: one step's crop is noise)."""
    tails = [r for h in histories for r in h[-max(1, len(h) // 20) :]]
    correct = predict(teacher, images).argmax(1) == labels
    return {
        "teacher_synthetic_accuracy": round(float(correct.float().mean() * 100), 2),
        "final_bn_loss": round(sum(r["bn"] for r in tails) / len(tails), 4),
        "final_ce": round(sum(r["ce"] for r in tails) / len(tails), 4),
    }


def batch_generator(seed: int, index: int) -> torch.Generator:
    """One generator per batch: a resumed run draws exactly what the uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def saving_partial(checkpoints: Checkpoints, state: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Checkpoint callback of a batch: the finished work in ``state`` plus the batch's snapshot."""
    return lambda snapshot: checkpoints.save({**state, "partial": snapshot})


def with_batch(
    state: dict[str, Any], images: torch.Tensor, history: list[dict[str, float]]
) -> dict[str, Any]:
    """The resumable state after one more finished batch."""
    return {
        **state,
        "batches": [*state["batches"], images],
        "histories": [*state["histories"], history],
        "partial": None,
    }


def class_major(batches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Batches of one image per class -> class-major order (every image of class 0, then 1, ...), on
    ``device`` (batches restored from a checkpoint come back on the CPU)."""
    stacked = torch.stack([batch.to(device) for batch in batches], dim=1)
    return stacked.reshape(-1, *stacked.shape[2:])


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def checked_teacher(inputs: DistillInputs) -> tuple[nn.Module, float]:
    """The frozen teacher, once it has passed the class-order guard (and the accuracy it scored)."""
    cfg: RecoverConfig = inputs.method_cfg
    if inputs.teacher is None:
        raise ConfigError("recovery needs a teacher")
    teacher = frozen(inputs.teacher)
    generator = torch.Generator().manual_seed(inputs.seed)
    guard = check_class_order(
        teacher, inputs.data, cfg.min_teacher_accuracy, cfg.check_images_per_class, generator
    )
    return teacher, guard


def recover_set(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT) -> SyntheticSet:
    """SRe2L / CDA: the batches ``inputs.units`` (IPC indices) of one image per class, each recovered
    from noise (or real) with its own generator, so a shard recovers what the whole run would; the
    batches in order (batch-major), their labels and history (:func:`merge_recovered` joins them)."""
    cfg: RecoverConfig = inputs.method_cfg
    data = inputs.data
    teacher, guard = checked_teacher(inputs)
    labels = torch.arange(data.num_classes, device=data.device)
    indices = inputs.units if inputs.units is not None else range(inputs.ipc)
    state = checkpoints.load() or {"batches": [], "histories": [], "partial": None}
    if state["batches"] or state["partial"]:
        progress.note(f"resuming recovery with {len(state['batches'])} of {len(indices)} batches done")
    for index in indices[len(state["batches"]) :]:
        generator = batch_generator(inputs.seed, index)
        init = initial_batch(data, labels, cfg.init, generator)
        images, history = recover_batch(
            teacher,
            init,
            labels,
            cfg,
            pixel_bounds(data),
            generator,
            saving_partial(checkpoints, state),
            resume=state["partial"],
            progress=progress,
            label=f"batch {index + 1}/{inputs.ipc}",
        )
        state = with_batch(state, images, history)
        checkpoints.save(state)
    return SyntheticSet(
        images=torch.cat([batch.to(data.device) for batch in state["batches"]]),
        labels=labels.repeat(len(state["batches"])),
        history=[{"batch": b, **r} for b, h in zip(indices, state["histories"], strict=False) for r in h],
        stats={"teacher_check_accuracy": round(guard, 2)},
    )


def merge_recovered(inputs: DistillInputs, parts: list[SyntheticSet]) -> SyntheticSet:
    """The shards' batches, in IPC order, as one class-major set, with the recovery's statistics."""
    classes = inputs.data.num_classes
    batches = [batch for part in parts for batch in part.images.split(classes)]
    images = class_major(batches, inputs.data.device)
    labels = torch.arange(classes, device=inputs.data.device).repeat_interleave(len(batches))
    history = [record for part in parts for record in part.history]
    histories: list[list[dict[str, float]]] = [[] for _ in batches]
    for record in history:
        histories[record["batch"]].append({k: v for k, v in record.items() if k != "batch"})
    assert inputs.teacher is not None  # checked when the batches were recovered
    return SyntheticSet(
        images=images,
        labels=labels,
        history=history,
        stats={
            "teacher_check_accuracy": parts[0].stats["teacher_check_accuracy"],
            **summarize_recovery(frozen(inputs.teacher), images, labels, histories),
        },
    )


RECOVERED = Sharding("ipc", merge_recovered)
"""SRe2L's and CDA's shards: ranges of IPC indices, each batch one image of every class."""
