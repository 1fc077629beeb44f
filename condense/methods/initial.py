"""Where a synthetic set starts: random real images, noise, or DREAM's k-means picks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from condense.models import ConvNet
from condense.prepare import PreparedDataset
from condense.sampling import kmeans_init
from condense.training import random_seed, sample_per_class


def init_real(data: PreparedDataset, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """``ipc`` randomly chosen real training images per class, class-major order."""
    return data.train_x[sample_per_class(data.train_y, data.num_classes, ipc, generator)].clone()


def initial_images(
    data: PreparedDataset,
    ipc: int,
    init: str,
    generator: torch.Generator,
    network: Callable[[int], ConvNet],
) -> torch.Tensor:
    """The synthetic set's starting point, class-major: random real images (``real``), Gaussian noise
    (``noise``), or DREAM's ``kmeans``: per class, the real images nearest the k-means centroids of
    ``network(seed)``'s features (each method says which network it embeds with)."""
    if init == "real":
        return init_real(data, ipc, generator)
    if init == "kmeans":
        seed = random_seed(generator)
        with torch.no_grad():
            return kmeans_init(data.train_x, data.train_y, data.num_classes, ipc, network(seed).embed, seed)
    shape = (data.num_classes * ipc, data.channels, data.resolution, data.resolution)
    return torch.randn(*shape, generator=generator).to(data.train_x.device)
