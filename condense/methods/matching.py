"""What gradient matching (DC/DSA) and distribution matching (DM) share.

Both optimise the pixels of a class-major synthetic set so that, under freshly initialised networks,
each class's synthetic images look like a real batch of that class (in gradients for DSA, in mean
features for DM). This module owns everything around the per-method ``step``: the config fields both
have, the synthetic-set initialisation (real, noise or DREAM's k-means), the real-batch sampler
(random, or DREAM's representative one), the outer loop with checkpoint/resume, and divergence handling.

Every draw is keyed by its place: iteration ``i``'s network by (seed, i), class ``c``'s real batch and
DSA transform by (seed, clock, c). A run over some of the classes (``DistillInputs.units``) therefore
optimises them exactly as the run over all of them does, so a method whose classes are otherwise
independent (DM: a frozen network, a per-class loss, an element-wise SGD) shards by class
(:data:`CLASS_SHARDS`), and a resumed run needs no random state beyond the iteration it reached.

Images distilled before (``DistillInputs.frozen``, PDD's earlier stages, class-major) lead each class's
block of the set: they are in the class's synthetic batch (matched, embedded, trained on) exactly like
the new images, and never move (their rows of the pixels' gradient are zeroed before every step, and
the given images are put back, bit for bit, at the end). They draw nothing: the new images' start and
every keyed draw are those of a run without them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig, Strict
from condense.methods import Sharding
from condense.methods.base import Checkpoints, DistillInputs, Progress, Resumable, ResumableLoop, SyntheticSet
from condense.methods.initial import initial_images
from condense.methods.sampling import Embed, make_sampler
from condense.models import ConvNet
from condense.prepare import RealData
from condense.training import derived_seed, random_seed, student_model

SHARED_NETWORK = (
    "each iteration's network trains on every class between matching passes (DSA, and DREAM, which "
    "runs on DSA by default), so no class's next pass is independent of the others"
)
"""Why the gradient-matching methods do not shard (``compute.shards``)."""

FIXED_POINT = 2**32
"""A shard's per-iteration loss is kept as an integer sum of class losses in units of 2**-32: integer
sums do not depend on the grouping, so the merged loss curve is the unsharded one bit for bit (a float
sum over classes would round differently for each shard count)."""


class MatchingConfig(Strict):
    """Fields every matching method has; each method sets its own defaults where the papers differ."""

    iterations: int = Field(default=1000, gt=0)
    """Outer iterations, each with a freshly initialised network."""
    lr_img: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.5, ge=0)
    """Momentum of the SGD on the pixels (0.5 in DC, DSA and DM)."""
    batch_real: int = Field(default=256, gt=0)
    """Real images per class in each matching step (the whole class when it has fewer)."""
    sampler: Literal["random", "representative"] = "random"
    """How the real batch is chosen: at random, or DREAM's samples nearest k-means centroids."""
    interval: int = Field(default=10, gt=0)
    """Representative sampler only: matching steps between re-clusterings (DREAM's 10)."""
    init: Literal["real", "noise", "kmeans"] = "real"
    """Synthetic start: random real images, Gaussian noise, or the real images nearest k-means centroids."""
    checkpoint_every: int = Field(default=50, gt=0)


class Sampler(Protocol):
    """A source of real batches (``condense.methods.sampling``): global indices of k samples of class c."""

    stats: dict[str, float]

    def indices(
        self, c: int, k: int, iteration: int, embed: Embed, generator: torch.Generator
    ) -> torch.Tensor: ...


@dataclass
class MatchingRun:
    """The state a method's ``step`` works on; one per ``distill`` call."""

    data: RealData
    ipc: int
    cfg: Any
    """The method's config, a ``MatchingConfig`` subclass."""
    model_cfg: ModelConfig
    dsa_cfg: DSAConfig
    classes: range
    """The classes this run optimises: every class, or a shard's range."""
    images: torch.Tensor
    """(len(classes) * (held + ipc), C, H, W) leaf tensor being optimised, class-major: each class's
    ``held`` frozen images, then its ``ipc`` new ones."""
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer
    seed: int
    generator: torch.Generator
    """This iteration's generator, seeded from (seed, iteration) before each ``step``."""
    sampler: Sampler
    held: int = 0
    """Frozen images per class (``DistillInputs.frozen``) leading each class's block; ``ipc`` counts the
    new ones only (DSA's loops follow it: the images this run distils)."""

    def fresh_net(self) -> ConvNet:
        """A randomly initialised ConvNet, seeded from the iteration's generator (so resumable)."""
        net = student_model(self.data, self.model_cfg, random_seed(self.generator))
        assert isinstance(net, ConvNet)  # student_model always builds the ConvNet
        return net

    def synthetic(self, c: int) -> torch.Tensor:
        """Class ``c``'s synthetic images (its frozen ones first), a view that carries gradients back to
        the pixels."""
        per_class = self.held + self.ipc
        first = (c - self.classes.start) * per_class
        return self.images[first : first + per_class]

    def pair(self, c: int, clock: int, net: ConvNet) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ``c``'s real batch and synthetic images under one DSA transform, both drawn from a
        generator of (seed, clock, c) alone, so no other class changes them. ``clock`` counts
        matching passes (the representative sampler re-clusters by it; it ranks by ``net``'s features)."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, clock, c))
        real = self.data.images(self.sampler.indices(c, self.cfg.batch_real, clock, net.embed, generator))
        seed = random_seed(generator)
        return dsa(real, self.dsa_cfg, seed), dsa(self.synthetic(c), self.dsa_cfg, seed)

    def update(self, loss: torch.Tensor) -> None:
        """One SGD step on the pixels; the frozen images' gradient is zeroed first, so they do not move
        (nor does their momentum, which stays zero)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = self.images.grad
        if self.held and grad is not None:
            grad.view(len(self.classes), self.held + self.ipc, *grad.shape[1:])[:, : self.held] = 0
        self.optimizer.step()


Step = Callable[[MatchingRun, int], torch.Tensor]
"""One outer iteration (0-based index): updates ``run.images`` and returns each class's loss, in
``run.classes`` order, detached and on the device (read once per iteration by the loop)."""


def class_labels(classes: range, ipc: int) -> torch.Tensor:
    return torch.tensor(list(classes)).repeat_interleave(ipc)


def new_sampler(data: RealData, cfg: MatchingConfig, seed: int, carried: dict[str, float]) -> Sampler:
    """A sampler whose cost stats continue from ``carried`` (they are cumulative over the run)."""
    sampler = make_sampler(cfg.sampler, data.images, data.train_y, data.num_classes, cfg.interval, seed)
    sampler.stats.update(carried)
    return sampler


def frozen_prefix(inputs: DistillInputs, classes: range) -> tuple[int, torch.Tensor | None]:
    """(frozen images per class, those of ``classes``, class-major) of ``inputs.frozen``; (0, None)
    without one. Refuses a set that is not class-major with the same count in every class."""
    frozen = inputs.frozen
    if frozen is None:
        return 0, None
    num_classes = inputs.data.num_classes
    held = len(frozen.images) // num_classes
    expected = class_labels(range(num_classes), held)
    if held * num_classes != len(frozen.images) or not torch.equal(frozen.labels.cpu().long(), expected):
        raise ValueError(
            f"frozen images must be class-major, as many in every class: {len(frozen.images)} images"
            f" for {num_classes} classes"
        )
    return held, frozen.images[classes.start * held : classes.stop * held]


def per_class_cat(first: torch.Tensor, m: int, second: torch.Tensor, n: int) -> torch.Tensor:
    """Two class-major sets of ``m`` and ``n`` images a class as one, each class's ``m`` first."""
    classes = len(first) // m
    shape = first.shape[1:]
    return torch.cat([first.reshape(classes, m, *shape), second.reshape(classes, n, *shape)], 1).flatten(0, 1)


def run_matching(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, step: Step, label: str
) -> SyntheticSet:
    """The outer loop of a matching method over the classes ``inputs.units`` (every class when None):
    ``step`` once per iteration, checkpointed, resumable; ``inputs.frozen`` leads each class's block
    and never moves (the module docstring). Its history holds each iteration's loss as
    a fixed-point class sum; :func:`merge_classes` makes the set (and its loss curve) whole."""
    cfg: MatchingConfig = inputs.method_cfg
    data = inputs.data
    classes = inputs.units if inputs.units is not None else range(data.num_classes)
    generator = torch.Generator().manual_seed(inputs.seed)
    # Every class's start is drawn as the whole run draws it, then the run keeps its own classes.
    # DREAM's k-means initialisation embeds with a randomly initialised network, as matching starts from one.
    start = initial_images(
        data, inputs.ipc, cfg.init, generator, lambda seed: student_model(data, inputs.model_cfg, seed)
    )
    images = start[classes.start * inputs.ipc : classes.stop * inputs.ipc].clone()
    held, kept = frozen_prefix(inputs, classes)
    if kept is not None:  # each class's block: its frozen images, then its new ones
        images = per_class_cat(kept.to(images.device), held, images, inputs.ipc)
    images.requires_grad_(True)
    optimizer = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum)
    resumable = Resumable({"images": images}, {"opt_img": optimizer}, generator)
    loop = ResumableLoop(
        label, cfg.iterations, cfg.checkpoint_every, checkpoints.save, resumable, "lower distill.lr_img"
    )
    state = checkpoints.load()
    start_it, history = loop.resume(state, progress)
    stats: dict[str, float] = state["sampler_stats"] if state is not None else {}

    run = MatchingRun(
        data=data,
        ipc=inputs.ipc,
        cfg=cfg,
        model_cfg=inputs.model_cfg,
        dsa_cfg=inputs.dsa_cfg,
        classes=classes,
        images=images,
        labels=class_labels(classes, held + inputs.ipc).to(images.device),
        optimizer=optimizer,
        seed=inputs.seed,
        generator=generator,
        sampler=new_sampler(data, cfg, inputs.seed, stats),
        held=held,
    )

    for it in range(start_it, cfg.iterations):
        if it > start_it and it % cfg.checkpoint_every == 0:
            # A fresh sampler at every checkpoint boundary, as a resumed run gets one: the representative
            # sampler's cluster cache then never outlives a checkpoint, so a resumed run re-clusters
            # exactly where an uninterrupted one does (at the cost of at most one extra clustering per
            # checkpoint_every iterations).
            run.sampler = new_sampler(data, cfg, inputs.seed, run.sampler.stats)
        generator.manual_seed(derived_seed(inputs.seed, it))
        class_losses = step(run, it).double().tolist()
        loss = math.fsum(class_losses) / len(classes)
        loop.check(it, loss)
        loss_sum = sum(round(value * FIXED_POINT) for value in class_losses)
        history.append({"iteration": it + 1, "loss_sum": loss_sum, **run.sampler.stats})
        progress.step(it + 1, cfg.iterations, f"loss {loss:.4f}")
        loop.checkpoint(it, history, sampler_stats=dict(run.sampler.stats))

    final = images.detach().clone()
    if kept is not None:  # exactly as given (they never moved; this makes it so by construction)
        blocks = final.view(len(classes), held + inputs.ipc, *final.shape[1:])
        blocks[:, :held] = kept.to(final.device).reshape(len(classes), held, *final.shape[1:])
    return SyntheticSet(
        images=final,
        labels=run.labels,
        lr=None,
        history=history,
        stats=dict(run.sampler.stats),
    )


def merge_classes(inputs: DistillInputs, parts: list[SyntheticSet]) -> SyntheticSet:
    """The runs over consecutive class ranges (in class order) as one set: their images and labels
    concatenated; per iteration, the loss per class over every class and the sampler's costs summed."""
    num_classes = inputs.data.num_classes
    history = []
    for rows in zip(*(part.history for part in parts), strict=True):
        merged: dict[str, float] = {"iteration": rows[0]["iteration"]}
        merged["loss"] = sum(row["loss_sum"] for row in rows) / FIXED_POINT / num_classes
        for name in rows[0]:
            if name not in ("iteration", "loss_sum"):
                merged[name] = sum(row[name] for row in rows)
        history.append(merged)
    stats = {name: sum(part.stats[name] for part in parts) for name in parts[0].stats}
    return SyntheticSet(
        images=torch.cat([part.images for part in parts]),
        labels=torch.cat([part.labels for part in parts]),
        lr=None,
        history=history,
        stats=stats,
    )


CLASS_SHARDS = Sharding("class", merge_classes)
"""How a matching method whose classes are independent shards: by class, merged in class order."""
