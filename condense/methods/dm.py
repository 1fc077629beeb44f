"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023; main_DM.py of
VICO-UoE/DatasetCondensation).

Each iteration embeds, with a freshly initialised and frozen ConvNet, a real batch and the synthetic
images of every class under one shared DSA transform per class, and takes one SGD step on the pixels
to reduce sum_c ||mean embed(real_c) - mean embed(syn_c)||^2. No bi-level optimisation, so an
iteration costs a few forward passes.

Default ``iterations`` is 1000 here, not the paper's 20000, to fit CPU budgets; raise it for paper
numbers (DM's loss keeps improving slowly long after 1000).
"""

from __future__ import annotations

import torch
from pydantic import Field

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.matching import SHARED_NETWORK, MatchingConfig, MatchingRun, run_matching


class DMConfig(MatchingConfig):
    iterations: int = Field(default=1000, gt=0)
    """The paper runs 20000."""
    lr_img: float = Field(default=1.0, gt=0)


def class_means(features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(classes, D) mean feature of each consecutive block of ``sizes`` rows."""
    return torch.stack([block.mean(0) for block in torch.split(features, sizes)])


def step(run: MatchingRun, iteration: int) -> float:
    """One iteration; returns the loss per class (as DM prints it)."""
    net = run.fresh_net()
    net.train()
    net.requires_grad_(False)
    reals, syns = [], []
    for c in range(run.num_classes):
        real, syn = run.siamese(run.real(c, iteration, net), run.synthetic(c))
        reals.append(real)
        syns.append(syn)
    # One forward per side for all classes: identical to per-class forwards for instance norm, and
    # for BatchNorm it is what DM's code does (statistics over every class's batch).
    with torch.no_grad():
        real_means = class_means(net.embed(torch.cat(reals)), [len(r) for r in reals])
    syn_means = class_means(net.embed(torch.cat(syns)), [len(s) for s in syns])
    loss = (real_means - syn_means).pow(2).sum()
    run.update(loss)
    return loss.item() / run.num_classes


@register_method("dm", config=DMConfig, streams=True, shards=SHARED_NETWORK)
def distill(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, label: str = "DM"
) -> SyntheticSet:
    return run_matching(inputs, checkpoints, progress, step, label)
