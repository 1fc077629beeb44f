"""Where a synthetic set starts: random real images, noise, DREAM's k-means picks, DATM's real
images an expert classifies correctly, or AST's representative images."""

from __future__ import annotations

from collections.abc import Callable

import torch

from condense.datasets.common import sample_per_class
from condense.methods.sampling import kmeans_init
from condense.models import ConvNet
from condense.prepare import RealData
from condense.training import indexed_logits, random_seed

CHUNK = 256
"""Images classified at a time while looking for correctly classified ones."""


def init_real(data: RealData, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """``ipc`` randomly chosen real training images per class, class-major order."""
    return data.images(sample_per_class(data.train_y, data.num_classes, ipc, generator)).clone()


def init_correct(
    data: RealData, ipc: int, generator: torch.Generator, classifier: torch.nn.Module
) -> torch.Tensor:
    """DATM's ``samples_predicted_correctly``: per class, random real images ``classifier`` gets right
    (a class with fewer than ``ipc`` of them is topped up with its other images), class-major.

    Each class is classified in its random order a chunk at a time until ``ipc`` are right, so a
    streamed dataset reads a few images per class rather than the whole split."""
    picks = []
    for c in range(data.num_classes):
        members = torch.nonzero(data.train_y == c).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator).to(members.device)]
        right, wrong = [], []
        for chunk in torch.split(shuffled, max(4 * ipc, CHUNK)):
            correct = indexed_logits(classifier, data, chunk).argmax(1).to(chunk.device) == c
            right.append(chunk[correct])
            wrong.append(chunk[~correct])
            if sum(len(r) for r in right) >= ipc:
                break
        picks.append(torch.cat([*right, *wrong])[:ipc])
    return data.images(torch.cat(picks)).clone()


def initial_images(
    data: RealData,
    ipc: int,
    init: str,
    generator: torch.Generator,
    network: Callable[[int], ConvNet],
) -> torch.Tensor:
    """The synthetic set's starting point, class-major: random real images (``real``), Gaussian noise
    (``noise``), DREAM's ``kmeans``: per class, the real images nearest the k-means centroids of
    ``network(seed)``'s features (each method says which network it embeds with), DATM's
    ``correct``: real images ``network(seed)`` classifies correctly, or AST's ``representative``: per
    class, the real images nearest the k-means centroids of ``network(seed)``'s logits (AST's
    ``get_repre_images`` clusters the final expert's outputs)."""
    if init == "real":
        return init_real(data, ipc, generator)
    if init == "correct":
        return init_correct(data, ipc, generator, network(random_seed(generator)))
    if init in ("kmeans", "representative"):
        seed = random_seed(generator)
        net = network(seed)
        encode = net.embed if init == "kmeans" else net
        with torch.no_grad():
            return kmeans_init(data.images, data.train_y, data.num_classes, ipc, encode, seed)
    shape = (data.num_classes * ipc, data.channels, data.resolution, data.resolution)
    return torch.randn(*shape, generator=generator).to(data.device)
