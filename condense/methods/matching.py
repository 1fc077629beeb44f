"""What gradient matching (DC/DSA) and distribution matching (DM) share.

Both optimise the pixels of a class-major synthetic set so that, under freshly initialised networks,
each class's synthetic images look like a real batch of that class (in gradients for DSA, in mean
features for DM). This module owns everything around the per-method ``step``: the config fields both
have, the synthetic-set initialisation (real, noise or DREAM's k-means), the real-batch sampler
(random, or DREAM's representative one), the outer loop with checkpoint/resume, and divergence handling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig, Strict
from condense.methods.base import Checkpoints, DistillInputs, Progress, Resumable, ResumableLoop, SyntheticSet
from condense.methods.initial import initial_images
from condense.methods.sampling import Embed, make_sampler
from condense.models import ConvNet
from condense.prepare import RealData
from condense.training import random_seed, student_model

SHARED_NETWORK = (
    "every class is matched through the one network each iteration draws from the run's generator; "
    "DSA and DREAM also train it on every class between passes"
)
"""Why the matching methods do not shard (``compute.shards``)."""


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
    images: torch.Tensor
    """(classes * ipc, C, H, W) leaf tensor being optimised, class-major."""
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    sampler: Sampler

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def fresh_net(self) -> ConvNet:
        """A randomly initialised ConvNet, seeded from the run's generator (so resumable)."""
        net = student_model(self.data, self.model_cfg, random_seed(self.generator))
        assert isinstance(net, ConvNet)  # student_model always builds the ConvNet
        return net

    def synthetic(self, c: int) -> torch.Tensor:
        """Class ``c``'s synthetic images, a view that carries gradients back to the pixels."""
        return self.images[c * self.ipc : (c + 1) * self.ipc]

    def real(self, c: int, step: int, net: ConvNet) -> torch.Tensor:
        """A real batch of class ``c``; the representative sampler ranks samples by ``net``'s features."""
        idx = self.sampler.indices(c, self.cfg.batch_real, step, net.embed, self.generator)
        return self.data.images(idx)

    def siamese(self, real: torch.Tensor, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both batches augmented with one DSA seed, so they are compared under the same transform."""
        seed = random_seed(self.generator)
        return dsa(real, self.dsa_cfg, seed), dsa(syn, self.dsa_cfg, seed)

    def update(self, loss: torch.Tensor) -> None:
        """One SGD step on the pixels."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


Step = Callable[[MatchingRun, int], float]
"""One outer iteration (0-based index): updates ``run.images`` and returns the iteration's mean loss."""


def class_labels(num_classes: int, ipc: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(ipc)


def new_sampler(
    data: RealData, cfg: MatchingConfig, generator: torch.Generator, carried: dict[str, float]
) -> Sampler:
    """A sampler seeded from ``generator``, whose cost stats continue from ``carried`` (they are
    cumulative over the run)."""
    seed = random_seed(generator)
    sampler = make_sampler(cfg.sampler, data.images, data.train_y, data.num_classes, cfg.interval, seed)
    sampler.stats.update(carried)
    return sampler


def run_matching(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, step: Step, label: str
) -> SyntheticSet:
    """The outer loop of a matching method: ``step`` once per iteration, checkpointed, resumable."""
    cfg: MatchingConfig = inputs.method_cfg
    data = inputs.data
    generator = torch.Generator().manual_seed(inputs.seed)
    # DREAM's k-means initialisation embeds with a randomly initialised network, as matching starts from one.
    images = initial_images(
        data, inputs.ipc, cfg.init, generator, lambda seed: student_model(data, inputs.model_cfg, seed)
    ).requires_grad_(True)
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
        images=images,
        labels=class_labels(data.num_classes, inputs.ipc).to(images.device),
        optimizer=optimizer,
        generator=generator,
        sampler=new_sampler(data, cfg, generator, stats),
    )

    for it in range(start_it, cfg.iterations):
        if it > start_it and it % cfg.checkpoint_every == 0:
            # A fresh sampler at every checkpoint boundary, as a resumed run gets one: the representative
            # sampler's cluster cache and k-means seeds then never outlive a checkpoint, so a resumed run
            # re-clusters exactly where an uninterrupted one does (at the cost of at most one extra clustering
            # per checkpoint_every iterations).
            run.sampler = new_sampler(data, cfg, generator, run.sampler.stats)
        loss = step(run, it)
        loop.check(it, loss)
        history.append({"iteration": it + 1, "loss": loss, **run.sampler.stats})
        progress.step(it + 1, cfg.iterations, f"loss {loss:.4f}")
        loop.checkpoint(it, history, sampler_stats=dict(run.sampler.stats))

    return SyntheticSet(
        images=images.detach().clone(),
        labels=run.labels,
        lr=None,
        history=history,
        stats=dict(run.sampler.stats),
    )
