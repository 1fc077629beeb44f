"""Generated data: a learnable image classification set of any size, for trying the streaming path,
the tests, and the benchmarks (``bench/streaming.py``, ``bench/matrix.py``) without a download.

Class ``c`` is a smooth random colour field of its own (drawn once from the seed) with per-image
noise, shift and brightness, written as JPEG: WebDataset shards (``train-NNNNNN.tar`` and
``test-NNNNNN.tar`` with a ``cls`` member, :func:`write_shards`), or the layout and shape of a
benchmark dataset card (:func:`write_benchmark`: CIFAR-100's shards, Tiny-ImageNet's official
folder, an ImageNet folder holding one of MTT's subsets).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _prototypes(classes: int, side: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.uniform(0, 255, size=(classes, 4, 4, 3)).astype(np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((side, side), Image.Resampling.BILINEAR)) for c in coarse]
    ).astype(np.float32)


def _image(prototype: np.ndarray, rng: np.random.Generator, quality: int = 90) -> bytes:
    side = prototype.shape[0]
    shift = rng.integers(-side // 8, side // 8 + 1, size=2)
    image = np.roll(prototype, tuple(shift), axis=(0, 1))
    image = image * rng.uniform(0.7, 1.3) + rng.normal(0, 25, size=image.shape)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shards(
    root: str | Path,
    classes: int,
    train_per_class: int,
    test_per_class: int,
    side: int,
    per_shard: int = 1000,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write train and test shards of ``classes`` x ``*_per_class`` JPEG images of ``side`` pixels under
    ``root`` (samples of all classes interleaved, as shuffled shards are); returns ``root``."""
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = _prototypes(classes, side, rng)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), per_class)
        labels = labels[rng.permutation(len(labels))]
        pattern = str(root / f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0) as sink:
            for i, label in enumerate(labels):
                sink.write(
                    {
                        "__key__": f"{split}{i:08d}",
                        "jpg": _image(prototypes[label], rng, quality),
                        "cls": str(int(label)),
                    }
                )
    return root


SUBSETS = ("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")
BENCHMARKS = ("cifar100", "tinyimagenet", *SUBSETS)
"""The dataset cards :func:`write_benchmark` can imitate."""


def write_benchmark(
    name: str, root: str | Path, train_per_class: int, test_per_class: int, seed: int = 0
) -> Path:
    """Generated data in the layout and shape the dataset card ``name`` reads; returns the path to
    give as ``dataset.path``:

    - ``cifar100``: shards of 100 classes of 32 px with a ``classes.txt``;
    - ``tinyimagenet``: Tiny-ImageNet's official folder (``train/<wnid>/images``, ``val/images`` +
      ``val_annotations.txt``, ``wnids.txt``, ``words.txt``), 200 classes of 64 px;
    - an MTT subset (``imagenette``, ...): an ImageNet folder (``train/<wnid>``, ``val/<wnid>``) of
      the subset's ten classes and two others, 160 x 120 px images (the card crops them to 128).
    """
    from condense.datasets.imagenet_subsets import subset_classes

    root = Path(root)
    rng = np.random.default_rng(seed)
    if name == "cifar100":
        write_shards(root, 100, train_per_class, test_per_class, 32, seed=seed)
        (root / "classes.txt").write_text("".join(f"class_{c:02d}\n" for c in range(100)))
        return root
    if name == "tinyimagenet":
        wnids = [f"n{10000000 + 37 * c:08d}" for c in range(200)]
        prototypes = _prototypes(200, 64, rng)
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
        (root / "words.txt").write_text("".join(f"{w}\tthing {c}, other {c}\n" for c, w in enumerate(wnids)))
        annotations = []
        for c, wnid in enumerate(wnids):
            images = root / "train" / wnid / "images"
            images.mkdir(parents=True, exist_ok=True)
            for k in range(train_per_class):
                (images / f"{wnid}_{k}.JPEG").write_bytes(_image(prototypes[c], rng))
            for k in range(test_per_class):
                file = f"val_{c * test_per_class + k}.JPEG"
                (root / "val" / "images" / file).write_bytes(_image(prototypes[c], rng))
                annotations.append(f"{file}\t{wnid}\t0\t0\t63\t63\n")
        (root / "val" / "val_annotations.txt").write_text("".join(annotations))
        return root
    if name not in BENCHMARKS:
        raise ValueError(f"no generator for {name!r}; choose from {', '.join(BENCHMARKS)}")
    wnids = [*subset_classes(name), "n09999991", "n09999992"]
    prototypes = _prototypes(len(wnids), 160, rng)[:, :120]
    for split, per_class in (("train", train_per_class), ("val", test_per_class)):
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                (folder / f"{wnid}_{k}.JPEG").write_bytes(_image(prototypes[c], rng))
    return root
