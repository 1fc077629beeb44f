"""DSA: gradient matching with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), i.e. the
DC/DSA algorithm of VICO-UoE/DatasetCondensation (main.py with ``--method DSA``).

Each outer iteration takes a freshly initialised ConvNet and, ``outer_loop`` times:

1. per class c: a real batch of class c and the class's synthetic images, both augmented with one DSA
   seed; the cross-entropy gradients of the network's parameters on each (the synthetic one
   differentiable); loss += ``match_loss`` (DC's layer-wise 1 - cosine distance);
2. one SGD step on the pixels (momentum 0.5);
3. except after the last pass: ``inner_loop`` epochs of training the network on the (detached,
   DSA-augmented) synthetic set, so later passes match gradients further along a training trajectory.

As in DC, a BatchNorm network first has its statistics fixed from 16 random real images per class,
because a synthetic batch (one image per class at ipc 1) is too small to estimate them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from condense.datasets.common import sample_per_class
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.matching import SHARED_NETWORK, MatchingConfig, MatchingRun, merge_classes, run_matching
from condense.models import ConvNet
from condense.prepare import RealData
from condense.training import train_epoch

DC_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}
"""DC's ``get_loops``: ipc -> (outer_loop, inner_loop)."""

BN_IMAGES_PER_CLASS = 16
"""Real images per class that fix BatchNorm statistics before matching (DC's BNSizePC)."""


class DSAMatchConfig(MatchingConfig):
    iterations: int = Field(default=1000, gt=0)
    lr_img: float = Field(default=0.1, gt=0)
    outer_loop: int | None = Field(default=None, gt=0)
    """Matching passes per fresh network; None = from ipc (``get_loops``)."""
    inner_loop: int | None = Field(default=None, gt=0)
    """Network training epochs on the synthetic set between passes; None = from ipc (``get_loops``)."""
    lr_net: float = Field(default=0.01, gt=0)
    """Plain SGD step size of the network's training between passes."""
    batch_train: int = Field(default=256, gt=0)
    """Synthetic batch size of that training (DC's batch_train; the whole set up to 256 images)."""


def get_loops(ipc: int) -> tuple[int, int]:
    """DC's (outer_loop, inner_loop) for ``ipc``; an ipc DC does not list takes the entry of the largest
    listed ipc below it (2-9 -> 1's, 11-19 -> 10's, ..., over 50 -> 50's)."""
    return DC_LOOPS[max(k for k in DC_LOOPS if k <= ipc)]


def loops(cfg: DSAMatchConfig, ipc: int) -> tuple[int, int]:
    outer, inner = get_loops(ipc)
    return cfg.outer_loop or outer, cfg.inner_loop or inner


def layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor) -> torch.Tensor:
    """DC's ``distance_wb``: the sum over output units of 1 - cosine similarity between their gradient
    rows. 1-D tensors (biases, norm scales) count 0, as in DC's code."""
    if g_real.dim() <= 1:
        return g_syn.new_zeros(())
    real = g_real.reshape(len(g_real), -1)
    syn = g_syn.reshape(len(g_syn), -1)
    cosine = (real * syn).sum(-1) / (real.norm(dim=-1) * syn.norm(dim=-1) + 1e-6)
    return (1 - cosine).sum()


def match_loss(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """DC's ``match_loss`` with ``dis_metric='ours'``: layer distances summed over parameters."""
    return torch.stack([layer_distance(s, r) for s, r in zip(g_syn, g_real, strict=True)]).sum()


def freeze_batchnorm(net: ConvNet, data: RealData, generator: torch.Generator) -> None:
    """Fix BatchNorm statistics from a real batch, then keep them (eval mode) while matching."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    idx = sample_per_class(data.train_y, data.num_classes, BN_IMAGES_PER_CLASS, generator)
    net.train()
    with torch.no_grad():
        net(data.images(idx))
    for norm in norms:
        norm.eval()


def class_loss(
    run: MatchingRun, net: ConvNet, params: list[torch.Tensor], c: int, matching_pass: int
) -> torch.Tensor:
    """Gradient-matching loss of class ``c``: real and synthetic CE gradients under one DSA transform."""
    real, syn = run.pair(c, matching_pass, net)
    ce_real = F.cross_entropy(net(real), torch.full((len(real),), c, device=real.device))
    g_real = [g.detach() for g in torch.autograd.grad(ce_real, params)]
    ce_syn = F.cross_entropy(net(syn), torch.full((len(syn),), c, device=syn.device))
    g_syn = torch.autograd.grad(ce_syn, params, create_graph=True)
    return match_loss(g_syn, g_real)


def step(run: MatchingRun, iteration: int) -> torch.Tensor:
    """One outer iteration; returns each class's loss per matching pass (DC prints their mean)."""
    cfg: DSAMatchConfig = run.cfg
    outer, inner = loops(cfg, run.ipc)
    net = run.fresh_net()
    net.train()
    params = list(net.parameters())
    opt_net = torch.optim.SGD(params, lr=cfg.lr_net)
    total = torch.zeros(len(run.classes), device=run.images.device)  # read once, by the loop
    for ol in range(outer):
        freeze_batchnorm(net, run.data, run.generator)
        # The sampler's clock counts matching passes, so DREAM's interval means what it does in DREAM.
        loss = torch.stack([class_loss(run, net, params, c, iteration * outer + ol) for c in run.classes])
        run.update(loss.sum())
        total += loss.detach()
        if ol == outer - 1:
            break
        images = run.images.detach()  # the network trains on a snapshot of the current synthetic set
        for _ in range(inner):
            train_epoch(
                net, images, run.labels, F.cross_entropy, opt_net, cfg.batch_train, run.generator, run.dsa_cfg
            )
    return total / outer


@register_method("dsa", config=DSAMatchConfig, streams=True, shards=SHARED_NETWORK)
def distill(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, label: str = "DSA"
) -> SyntheticSet:
    return merge_classes(inputs, [run_matching(inputs, checkpoints, progress, step, label)])
