"""Generated WebDataset shards: a learnable image classification set of any size, for trying the
streaming path, the tests, and the memory benchmark (``bench/streaming.py``) without a download.

Class ``c`` is a smooth random colour field of its own (drawn once from the seed) with per-image
noise, shift and brightness, written as JPEG with a ``cls`` member, ``train-NNNNNN.tar`` and
``test-NNNNNN.tar`` in the WebDataset layout the shard source reads.
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
                shift = rng.integers(-side // 8, side // 8 + 1, size=2)
                image = np.roll(prototypes[label], tuple(shift), axis=(0, 1))
                image = image * rng.uniform(0.7, 1.3) + rng.normal(0, 25, size=image.shape)
                buffer = io.BytesIO()
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
                    buffer, format="JPEG", quality=quality
                )
                sink.write({"__key__": f"{split}{i:08d}", "jpg": buffer.getvalue(), "cls": str(int(label))})
    return root
