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
    """(len(classes) * ipc, C, H, W) leaf tensor being optimised, class-major."""
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer
    seed: int
    generator: torch.Generator
    """This iteration's generator, seeded from (seed, iteration) before each ``step``."""
    sampler: Sampler

    def fresh_net(self) -> ConvNet:
        """A randomly initialised ConvNet, seeded from the iteration's generator (so resumable)."""
        net = student_model(self.data, self.model_cfg, random_seed(self.generator))
        assert isinstance(net, ConvNet)  # student_model always builds the ConvNet
        return net

    def synthetic(self, c: int) -> torch.Tensor:
        """Class ``c``'s synthetic images, a view that carries gradients back to the pixels."""
        first = (c - self.classes.start) * self.ipc
        return self.images[first : first + self.ipc]

    def pair(self, c: int, clock: int, net: ConvNet) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ``c``'s real batch and synthetic images under one DSA transform, both drawn from a
        generator of (seed, clock, c) alone, so no other class changes them. ``clock`` counts
        matching passes (the representative sampler re-clusters by it; it ranks by ``net``'s features)."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, clock, c))
        real = self.data.images(self.sampler.indices(c, self.cfg.batch_real, clock, net.embed, generator))
        seed = random_seed(generator)
        return dsa(real, self.dsa_cfg, seed), dsa(self.synthetic(c), self.dsa_cfg, seed)

    def update(self, loss: torch.Tensor) -> None:
        """One SGD step on the pixels."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
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


def run_matching(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, step: Step, label: str
) -> SyntheticSet:
    """The outer loop of a matching method over the classes ``inputs.units`` (every class when None):
    ``step`` once per iteration, checkpointed, resumable. Its history holds each iteration's loss as
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
    images = start[classes.start * inputs.ipc : classes.stop * inputs.ipc].clone().requires_grad_(True)
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
        labels=class_labels(classes, inputs.ipc).to(images.device),
        optimizer=optimizer,
        seed=inputs.seed,
        generator=generator,
        sampler=new_sampler(data, cfg, inputs.seed, stats),
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

    return SyntheticSet(
        images=images.detach().clone(),
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
