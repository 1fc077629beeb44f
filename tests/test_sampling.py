"""Random and representative (DREAM) real-batch samplers, and k-means initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condense.methods.sampling import (
    RandomSampler,
    RepresentativeSampler,
    kmeans_init,
    kmeans_nearest,
    make_sampler,
)

CLASS_SIZES = (20, 30, 5)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def random_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled labels, so that class members are not contiguous and global indexing is exercised."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(CLASS_SIZES)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randn(len(labels), 3, 4, 4, generator=g)
    return images, labels


def three_clusters() -> tuple[np.ndarray, list[int]]:
    """Three tight, far-apart 2-D clusters, each symmetric around one point that lies exactly at its
    mean, and the row indices of those three points."""
    offsets = np.array(
        [[0.0, 0.0], [0.5, 0.0], [-0.5, 0.0], [0.0, 0.4], [0.0, -0.4], [0.3, 0.3], [-0.3, -0.3]]
    )
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    points = np.concatenate([c + offsets for c in centres]).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(points))
    points = points[order]
    # Row i of `points` came from row order[i]; the centres were rows 0, 7, 14 before shuffling.
    where = np.argsort(order)
    return points, sorted(int(where[j * len(offsets)]) for j in range(3))


def make_samplers(images: torch.Tensor, labels: torch.Tensor) -> list[RandomSampler | RepresentativeSampler]:
    images_at = images.__getitem__
    return [RandomSampler(labels, 3), RepresentativeSampler(images_at, labels, 3, interval=10, seed=0)]


@pytest.mark.parametrize("which", [0, 1])
def test_indices_are_k_distinct_members_of_the_class(which: int) -> None:
    images, labels = random_data()
    sampler = make_samplers(images, labels)[which]
    g = torch.Generator().manual_seed(0)
    for c in (0, 1):
        idx = sampler.indices(c, 4, 0, identity, g)
        assert idx.dtype == torch.long
        assert len(idx) == 4 and len(set(idx.tolist())) == 4
        assert bool((labels[idx] == c).all())


@pytest.mark.parametrize("which", [0, 1])
def test_k_at_least_class_size_returns_the_whole_class(which: int) -> None:
    images, labels = random_data()
    sampler = make_samplers(images, labels)[which]
    g = torch.Generator().manual_seed(0)
    whole = set(torch.nonzero(labels == 2).flatten().tolist())
    for k in (5, 8):
        assert set(sampler.indices(2, k, 0, identity, g).tolist()) == whole


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_nearest_finds_the_points_at_the_cluster_means(seed: int) -> None:
    points, expected = three_clusters()
    assert sorted(kmeans_nearest(points, 3, seed=seed).tolist()) == expected


def test_representative_sampler_picks_the_cluster_means_through_embed() -> None:
    points, expected = three_clusters()
    images = torch.from_numpy(points).view(-1, 1, 1, 2)
    labels = torch.zeros(len(points), dtype=torch.long)
    sampler = RepresentativeSampler(images.__getitem__, labels, 1, feature_batch=4)
    idx = sampler.indices(0, 3, 0, identity, torch.Generator())
    assert sorted(idx.tolist()) == expected


def test_kmeans_nearest_indices_are_distinct_when_centroids_share_a_nearest_sample() -> None:
    # Two locations of four identical rows each and five centroids: at least two centroids sit on the
    # same location and share its nearest row (ties go to one row), so the later ones must fall back.
    points = np.array([[0.0, 0.0]] * 4 + [[9.0, 9.0]] * 4, np.float32)
    idx = kmeans_nearest(points, 5, seed=0)
    assert len(idx) == 5 and len(set(idx.tolist())) == 5
    assert idx.min() >= 0 and idx.max() < len(points)


def test_kmeans_nearest_with_k_at_least_n_returns_every_row() -> None:
    points = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert kmeans_nearest(points, 6, seed=0).tolist() == list(range(6))
    assert kmeans_nearest(points, 9, seed=0).tolist() == list(range(6))


def test_reclusters_only_every_interval_and_reuses_indices_in_between() -> None:
    images, labels = random_data()
    calls = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.flatten(1)

    # feature_batch larger than the class, so one embed call per clustering
    sampler = RepresentativeSampler(images.__getitem__, labels, 3, interval=10, seed=0, feature_batch=64)
    g = torch.Generator()
    picked = {}
    clustered_at = []
    for it in range(26):
        before = sampler.stats["reclusters"]
        picked[it] = sampler.indices(1, 6, it, counting, g).tolist()
        if sampler.stats["reclusters"] > before:
            clustered_at.append(it)
    assert clustered_at == [0, 10, 20]
    assert sampler.stats["reclusters"] == 3
    assert calls == [CLASS_SIZES[1]] * 3  # only class 1's images are embedded
    for it in range(26):
        assert picked[it] == picked[it - it % 10]
    assert sampler.stats["feature_seconds"] > 0 and sampler.stats["kmeans_seconds"] > 0


def test_cache_is_per_class_and_k() -> None:
    images, labels = random_data()
    sampler = RepresentativeSampler(images.__getitem__, labels, 3, interval=10)
    g = torch.Generator()
    sampler.indices(0, 4, 0, identity, g)
    sampler.indices(1, 4, 0, identity, g)
    sampler.indices(0, 6, 0, identity, g)
    sampler.indices(0, 4, 5, identity, g)
    assert sampler.stats["reclusters"] == 3


def test_representative_sampler_is_deterministic_for_a_seed() -> None:
    images, labels = random_data()
    weight = torch.randn(48, 8, generator=torch.Generator().manual_seed(1))

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight

    def run() -> list[list[int]]:
        sampler = RepresentativeSampler(images.__getitem__, labels, 3, interval=2, seed=7)
        g = torch.Generator()
        return [sampler.indices(c, 5, it, embed, g).tolist() for it in range(6) for c in (0, 1)]

    assert run() == run()


def test_random_sampler_follows_its_generator() -> None:
    _, labels = random_data()
    sampler = RandomSampler(labels, 3)
    first = sampler.indices(1, 6, 0, identity, torch.Generator().manual_seed(3))
    again = sampler.indices(1, 6, 0, identity, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert set(sampler.stats) == {"feature_seconds", "kmeans_seconds", "reclusters"}


def test_kmeans_init_is_class_major_real_images_and_deterministic() -> None:
    images, labels = random_data()
    ipc = 3
    out = kmeans_init(images.__getitem__, labels, 3, ipc, identity, seed=0)
    assert out.shape == (ipc * 3, *images.shape[1:])
    for c in range(3):
        real = images[labels == c].flatten(1)
        block = out[c * ipc : (c + 1) * ipc].flatten(1)
        # every synthetic image is exactly some real image of its own class, and no image repeats
        matches = [torch.nonzero((real == row).all(1)).flatten().tolist() for row in block]
        assert all(len(m) == 1 for m in matches)
        assert len({m[0] for m in matches}) == ipc
    assert out.data_ptr() != images.data_ptr()
    assert torch.equal(out, kmeans_init(images.__getitem__, labels, 3, ipc, identity, seed=0))


def test_kmeans_init_picks_the_cluster_means() -> None:
    points, expected = three_clusters()
    images = torch.from_numpy(points).view(-1, 1, 1, 2)
    labels = torch.zeros(len(points), dtype=torch.long)
    out = kmeans_init(images.__getitem__, labels, 1, 3, identity, seed=0)
    assert sorted(map(tuple, out.view(3, 2).tolist())) == sorted(map(tuple, points[expected].tolist()))


def test_kmeans_init_rejects_a_class_smaller_than_ipc() -> None:
    images, labels = random_data()
    with pytest.raises(ValueError, match="fewer than ipc"):
        kmeans_init(images.__getitem__, labels, 3, 6, identity, seed=0)


def test_make_sampler() -> None:
    images, labels = random_data()
    assert isinstance(make_sampler("random", images.__getitem__, labels, 3, 10, 0), RandomSampler)
    rep = make_sampler("representative", images.__getitem__, labels, 3, 4, 5)
    assert isinstance(rep, RepresentativeSampler) and rep.interval == 4 and rep.seed == 5
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("herding", images.__getitem__, labels, 3, 10, 0)


def test_kmeans_seed_varies_with_class_and_clustering(monkeypatch: pytest.MonkeyPatch) -> None:
    import condense.methods.sampling as sampling

    seeds = []
    real = sampling.kmeans_nearest

    def recording(features: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
        seeds.append(seed)
        return real(features, k, seed, niter)

    monkeypatch.setattr(sampling, "kmeans_nearest", recording)
    images, labels = random_data()
    sampler = RepresentativeSampler(images.__getitem__, labels, 3, interval=10, seed=0)
    for it in (0, 10, 20):
        for c in (0, 1):
            sampler.indices(c, 4, it, identity, torch.Generator())
    assert len(seeds) == 6 and len(set(seeds)) == 6
