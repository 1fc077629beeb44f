"""DataDAM: Efficient Dataset Distillation with Attention Matching (Sajedi, Khaki et al., ICCV 2023;
main_DataDAM.py and utils.py of DataDistillation/DataDAM).

DM (:mod:`condense.methods.dm`) with spatial attention matching added. Each iteration:

1. draw a freshly initialised ConvNet, its parameters frozen (no inner loop, no experts);
2. per class c, a real batch and the class's synthetic images under one DSA transform, and through
   the network, each block's activation a_l (after its ReLU) and the final embedding f;
3. for every block l but the last, each image's spatial attention map
   A_l = flatten(sum_channels |a_l|^p) / ||flatten(sum_channels |a_l|^p)||_2;
4. loss_c = 100 * (sum_l ||mean_real A_l - mean_syn A_l||^2 + lambda * ||mean_real f - mean_syn f||^2),
   the attention term (SAM) plus DM's embedding term weighted by lambda = ``task_balance``;
5. one SGD step (momentum 0.5) on the pixels to reduce sum_c loss_c.

The paper and its code disagree: the paper's hyperparameter table has p = 4 and 8000 iterations, the
code p = 1 (``get_attention(param=1, exp=1)``) and 20000 iterations. The defaults follow the code;
the ``paper`` budget of the recipe takes the table's values.

Deviation from the code, on purpose: each class is its own forward pass (the code embeds every
class's batch in one), so a class's loss depends on its own batches and pixels only. Under instance
norm (the ConvNet's default and DataDAM's) this is the same loss; under BatchNorm the statistics are
the class's. The classes are then independent given the iteration's network, and DataDAM shards by
class (``compute.shards``), byte for byte the unsharded set, with either norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from condense.errors import ConfigError
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.matching import CLASS_SHARDS, MatchingConfig, MatchingRun, run_matching
from condense.models import ConvNet, default_depth

LOSS_SCALE = 100.0
"""The code's factor on both terms; with ``lr_img`` it sets the step size on the pixels."""


class DataDAMConfig(MatchingConfig):
    iterations: int = Field(default=20000, gt=0)
    """The code's; the paper's table has 8000."""
    lr_img: float = Field(default=1.0, gt=0)
    """The paper's table: 1 up to IPC 50, 10 above."""
    batch_real: int = Field(default=64, gt=0)
    """The code's."""
    power: float = Field(default=1.0, ge=1)
    """p of the attention map sum_channels |a|^p: the code's 1 (``get_attention(param=1, exp=1)``); the
    paper's table has 4."""
    task_balance: float = Field(default=0.01, ge=0)
    """lambda, the weight of the final-embedding term: the paper's table has 0.01 for low-resolution
    data, 0.02 for high."""


def attention_map(activation: torch.Tensor, power: float) -> torch.Tensor:
    """(N, H*W) spatial attention of (N, C, H, W) activations: sum over channels of |a|^p, flattened,
    each image's map scaled to unit L2 norm."""
    return F.normalize(activation.abs().pow(power).sum(1).flatten(1), dim=1)


def mean_distance(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """||mean_real - mean_syn||^2, means over the batch (one class's term of the code's ``error``)."""
    return (real.mean(0) - syn.mean(0)).pow(2).sum()


def attention_loss(real: list[torch.Tensor], syn: list[torch.Tensor], power: float) -> torch.Tensor:
    """The attention term of one class: over the given blocks' activations, the distance between the
    real and the synthetic batch's mean attention maps."""
    distances = [
        mean_distance(attention_map(r, power), attention_map(s, power))
        for r, s in zip(real, syn, strict=True)
    ]
    return torch.stack(distances).sum()


def class_loss(run: MatchingRun, net: ConvNet, c: int, iteration: int) -> torch.Tensor:
    """Class ``c``'s loss under ``net``: the attention of every block but the last, plus the weighted
    final-embedding term, on one DSA transform of a real batch and the synthetic images."""
    cfg: DataDAMConfig = run.cfg
    real, syn = run.pair(c, iteration, net)
    with torch.no_grad():
        real_blocks, real_embedding = net.block_activations(real)
    syn_blocks, syn_embedding = net.block_activations(syn)
    attention = attention_loss(real_blocks[:-1], syn_blocks[:-1], cfg.power)
    return LOSS_SCALE * (attention + cfg.task_balance * mean_distance(real_embedding, syn_embedding))


def step(run: MatchingRun, iteration: int) -> torch.Tensor:
    """One iteration; returns each class's loss (the code prints their mean)."""
    net = run.fresh_net()
    net.train()
    net.requires_grad_(False)
    losses = torch.stack([class_loss(run, net, c, iteration) for c in run.classes])
    run.update(losses.sum())
    return losses.detach()


@register_method("datadam", config=DataDAMConfig, streams=True, shards=CLASS_SHARDS)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    """The classes ``inputs.units``."""
    depth = inputs.model_cfg.depth or default_depth(inputs.data.resolution)
    if depth < 2:
        raise ConfigError(
            f"DataDAM matches the attention of every ConvNet block but the last, and this ConvNet has"
            f" {depth} block ({inputs.data.resolution} px images): set model.depth to 2 or more"
        )
    return run_matching(inputs, checkpoints, progress, step, "DataDAM")
