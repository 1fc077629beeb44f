"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023; main_DM.py of
VICO-UoE/DatasetCondensation).

Each iteration embeds, with a freshly initialised and frozen ConvNet, a real batch and the synthetic
images of every class under one shared DSA transform per class, and takes one SGD step on the pixels
to reduce sum_c ||mean embed(real_c) - mean embed(syn_c)||^2. No bi-level optimisation, so an
iteration costs a few forward passes.

The classes are independent given the iteration's network (each class's loss touches only its own
pixels, and SGD steps each pixel alone), so DM shards by class (``compute.shards``), byte for byte the
unsharded set; with BatchNorm, whose statistics span the classes, it does not.

Default ``iterations`` is 1000 here, not the paper's 20000, to fit CPU budgets; raise it for paper
numbers (DM's loss keeps improving slowly long after 1000).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.matching import CLASS_SHARDS, MatchingConfig, MatchingRun, run_matching
from condense.models import ConvNet


class DMConfig(MatchingConfig):
    iterations: int = Field(default=1000, gt=0)
    """The paper runs 20000."""
    lr_img: float = Field(default=1.0, gt=0)


def check(cfg: Any) -> None:
    if cfg.model.norm == "batchnorm" and cfg.compute.shard_count() > 1:
        raise ValueError(
            "DM with BatchNorm embeds every class in one batch (the statistics span classes), so its "
            "classes do not shard: set compute.shards=1 or model.norm=instancenorm"
        )


def class_means(features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(classes, D) mean feature of each consecutive block of ``sizes`` rows."""
    return torch.stack([block.mean(0) for block in torch.split(features, sizes)])


def embedded_means(net: ConvNet, batches: list[torch.Tensor]) -> torch.Tensor:
    """(classes, D) mean embedding of each class's batch. As DM's code: one class at a time, so a
    class's embedding does not depend on which classes run beside it (a shard); with BatchNorm, one
    batch of every class, whose statistics then span the classes."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return class_means(net.embed(torch.cat(batches)), [len(b) for b in batches])
    return torch.stack([net.embed(batch).mean(0) for batch in batches])


def step(run: MatchingRun, iteration: int) -> torch.Tensor:
    """One iteration; returns each class's loss."""
    net = run.fresh_net()
    net.train()
    net.requires_grad_(False)
    reals, syns = zip(*(run.pair(c, iteration, net) for c in run.classes), strict=True)
    with torch.no_grad():
        real_means = embedded_means(net, list(reals))
    syn_means = embedded_means(net, list(syns))
    loss = (real_means - syn_means).pow(2).sum(1)
    run.update(loss.sum())
    return loss.detach()


@register_method("dm", config=DMConfig, check=check, streams=True, shards=CLASS_SHARDS)
def distill(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, label: str = "DM"
) -> SyntheticSet:
    """The classes ``inputs.units``; ``label`` names the run in progress lines (DREAM's)."""
    return run_matching(inputs, checkpoints, progress, step, label)
