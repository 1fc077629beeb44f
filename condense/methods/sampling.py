"""Which real samples a matching step sees: random ones, or DREAM's representative ones.

DREAM (Liu et al., ICCV 2023) replaces the random real batch of each class with the samples nearest
the k-means centroids of that class's features under the current network, re-clustering only every
``interval`` iterations because clustering every step would dominate the cost of distillation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from condense.devices import upload
from condense.training import derived_seed

Embed = Callable[[torch.Tensor], torch.Tensor]
"""Images (n, C, H, W) -> features (n, D), e.g. ``net.embed``; it must move inputs to its own device."""
ImagesAt = Callable[[torch.Tensor], torch.Tensor]
"""Global training indices -> those images as network inputs (``data.images``; for a tensor ``x``,
``x.__getitem__``); a streamed dataset reads only them."""

# k-means++ seeding puts one centroid in each well-separated group almost surely, where uniform seeding
# can start two in one group and leave Lloyd stuck; older faiss builds lack it and fall back to uniform.
_KMEANS_PLUS_PLUS = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)


SMALL_KMEANS_WORK = 50_000_000
"""Below this many multiply-adds per k-means pass (n * d * k), faiss runs single-threaded."""


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """One OpenMP thread for small problems: a per-class clustering (hundreds of points) is over in
    milliseconds, and faiss's thread start-up and spin-waiting made it 16x slower on 2 busy cores."""
    if work >= SMALL_KMEANS_WORK:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def kmeans_nearest(features: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
    """Row indices of the ``k`` samples nearest the centroids of a k-means clustering of ``features``.

    The indices are distinct: when two centroids share a nearest sample, the later centroid takes its
    nearest unused one. ``k >= n`` returns every row. Deterministic for a given ``seed``.
    """
    x = np.ascontiguousarray(features, dtype=np.float32).reshape(len(features), -1)
    n, d = x.shape
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    # Cluster all points (faiss would otherwise subsample to 256 per centroid, making the centroids of a
    # small k noisy) and silence the "too few points per centroid" warning, which is expected here.
    options: dict[str, int] = {"niter": niter, "seed": seed, "max_points_per_centroid": n}
    options["min_points_per_centroid"] = 1
    if _KMEANS_PLUS_PLUS is not None:
        options["init_method"] = _KMEANS_PLUS_PLUS
    with _threads_for(n * d * k):
        kmeans = faiss.Kmeans(d, k, verbose=False, **options)
        kmeans.train(x)
        index = faiss.IndexFlatL2(d)
        index.add(x)
        # k neighbours per centroid always suffice: at most k - 1 of them can already be taken.
        _, neighbours = index.search(kmeans.centroids, k)
    taken: set[int] = set()
    chosen = []
    for row in neighbours:
        pick = next(int(i) for i in row if int(i) not in taken)
        taken.add(pick)
        chosen.append(pick)
    return np.asarray(chosen, dtype=np.int64)


def _class_members(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def _empty_stats() -> dict[str, float]:
    return {"feature_seconds": 0.0, "kmeans_seconds": 0.0, "reclusters": 0.0}


@torch.no_grad()
def _features(images: ImagesAt, members: torch.Tensor, embed: Embed, batch: int) -> np.ndarray:
    """Features of the images at ``members`` as float32 on the CPU, read and embedded ``batch`` at a
    time (memory bounded by the batch, whatever the class's size)."""
    chunks = [embed(images(idx)).float().cpu() for idx in torch.split(members, batch)]
    return torch.cat(chunks).flatten(1).numpy()


class RandomSampler:
    """The baseline: ``k`` random real samples of class ``c``, drawn from ``generator``."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.members = _class_members(labels, num_classes)
        self.stats = _empty_stats()

    def indices(
        self, c: int, k: int, iteration: int, embed: Embed, generator: torch.Generator
    ) -> torch.Tensor:
        members = self.members[c]
        order = torch.randperm(len(members), generator=generator)[:k]
        return members[upload(order, members.device)]


class RepresentativeSampler:
    """DREAM's sampler: per class, the real samples nearest the k-means centroids of the current
    network's features, re-clustered every ``interval`` iterations and reused in between."""

    def __init__(
        self,
        images: ImagesAt,
        labels: torch.Tensor,
        num_classes: int,
        interval: int = 10,
        niter: int = 20,
        seed: int = 0,
        feature_batch: int = 512,
    ):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.images = images
        self.members = _class_members(labels, num_classes)
        self.interval = interval
        self.niter = niter
        self.seed = seed
        self.feature_batch = feature_batch
        self.stats = _empty_stats()
        # (class, k) -> (clustering period, i.e. iteration // interval, and the indices chosen then)
        self._cache: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}

    def indices(
        self, c: int, k: int, iteration: int, embed: Embed, generator: torch.Generator
    ) -> torch.Tensor:
        """Global indices of ``k`` representative samples of class ``c`` (``generator`` is unused:
        the choice is deterministic given the network, which keeps the sampler interchangeable)."""
        members = self.members[c]
        if k >= len(members):
            return members.clone()
        # Clusterings fall on multiples of the interval (and after a resume, at the first call), and
        # their seed depends on the period, so a run resumed at a multiple of the interval repeats an
        # uninterrupted one exactly.
        period = iteration // self.interval
        cached = self._cache.get((c, k))
        if cached is not None and cached[0] == period:
            return cached[1].clone()

        start = time.perf_counter()
        features = _features(self.images, members, embed, self.feature_batch)
        self.stats["feature_seconds"] += time.perf_counter() - start

        start = time.perf_counter()
        rows = kmeans_nearest(features, k, derived_seed(self.seed, c, period), self.niter)
        self.stats["kmeans_seconds"] += time.perf_counter() - start

        self.stats["reclusters"] += 1
        picked = members[torch.from_numpy(rows).to(members.device)]
        self._cache[(c, k)] = (period, picked)
        return picked.clone()


def make_sampler(
    kind: str, images: ImagesAt, labels: torch.Tensor, num_classes: int, interval: int, seed: int
) -> RandomSampler | RepresentativeSampler:
    """The real-batch sampler named by ``kind``: ``'random'`` or ``'representative'``."""
    if kind == "random":
        return RandomSampler(labels, num_classes)
    if kind == "representative":
        return RepresentativeSampler(images, labels, num_classes, interval=interval, seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; expected 'random' or 'representative'")


def kmeans_init(
    images: ImagesAt, labels: torch.Tensor, num_classes: int, ipc: int, embed: Embed, seed: int
) -> torch.Tensor:
    """``ipc`` real images per class nearest the k-means centroids of their features, class-major
    (ipc of class 0, then class 1, ...), as a copy."""
    picks = []
    for c, members in enumerate(_class_members(labels, num_classes)):
        # Fewer images than ipc would shift every later class out of line with the class-major labels.
        if len(members) < ipc:
            raise ValueError(f"class {c} has {len(members)} images, fewer than ipc={ipc}")
        features = _features(images, members, embed, 512)
        rows = kmeans_nearest(features, ipc, derived_seed(seed, c))
        picks.append(members[torch.from_numpy(rows).to(members.device)])
    return images(torch.cat(picks)).clone()
