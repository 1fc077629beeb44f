"""Real data streamed from WebDataset shards or a Hugging Face dataset, for datasets that do not fit
in memory.

The dataset stage keeps only an index (:mod:`condense.datasets.index`): labels in memory (8 bytes an
image; 10 MB for ImageNet-1K), images where they are, read by the source's
:class:`~condense.datasets.index.Reader` (tar byte ranges, or rows of memory-mapped Arrow files whose
blocks of rows are the "shards" below). Two ways to read them:

- **by index** (:meth:`StreamedDataset.images`): a class-balanced draw reads exactly its images,
  each shard once, by byte range, decoded in threads. RDED's candidates, the random-real baseline,
  real initialisation, the teacher's class-order check, calibration images, matching methods' real
  batches per class, DREAM's per-class features, CUDD's anchors, difficulty-scheduled expert epochs,
  whole-split scores in index order (CUDD's right/wrong, EL2N: :func:`condense.training.indexed_logits`).
- **by epoch** (:meth:`StreamedDataset.batches`): shards in a seeded order, split among DataLoader
  workers, each worker reading its shards sequentially through a seeded shuffle buffer and decoding
  (and, for ``transform: imagenet``, random-resized-cropping and flipping) in the worker. Teacher
  and expert training, EL2N's scoring networks, the full-data baseline, test accuracy.

Memory is the shuffle buffer (encoded bytes), the prefetched batches and the labels: flat in the
number of images. A decoded image is exactly what the in-memory path stores (same decoder, same
resize), so a draw by index gives the same tensors on both paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from condense import devices, zca
from condense.config import DatasetConfig
from condense.datasets.common import open_image
from condense.datasets.index import Reader, SplitIndex, TarReader, resolve_shards
from condense.errors import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TRAIN_SCALE = (0.08, 1.0)
_TRAIN_RATIO = (3 / 4, 4 / 3)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Decoding:
    """How an encoded image becomes pixels (picklable: DataLoader workers get a copy)."""

    channels: int
    resolution: int
    transform: str
    on_corrupt: str


def decode(
    blob: Any,
    how: Decoding,
    where: str,
    rng: np.random.Generator | None = None,
    opener: Callable[[Any], Image.Image] = open_image,
) -> np.ndarray | None:
    """uint8 ``(C, H, W)`` pixels of one image (``blob``, opened by ``opener``: a reader's ``open``),
    or None when it does not decode and corrupt images are skipped. ``rng`` given and ``transform:
    imagenet``: a RandomResizedCrop and flip (training)."""
    from condense.datasets.common import fit_image

    try:
        with opener(blob) as im:
            img = im.convert("L" if how.channels == 1 else "RGB")
            if rng is not None and how.transform == "imagenet":
                img = _random_resized_crop(img, how.resolution, rng)
            else:
                img = fit_image(img, how.resolution, how.transform)
            pixels = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as err:
        if how.on_corrupt == "skip":
            return None
        raise DatasetError(
            f"cannot decode image {where}: {err} (dataset.on_corrupt: skip leaves such images out of "
            "streamed epochs)"
        ) from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _random_resized_crop(img: Image.Image, side: int, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop(side, scale=(0.08, 1), ratio=(3/4, 4/3)) and a coin-flip mirror,
    drawn from ``rng`` (the clamped form of :func:`condense.crops.random_resized_boxes`)."""
    width, height = img.size
    area = rng.uniform(*_TRAIN_SCALE)
    aspect = math.exp(rng.uniform(math.log(_TRAIN_RATIO[0]), math.log(_TRAIN_RATIO[1])))
    w = min(1.0, math.sqrt(area * aspect))
    h = min(1.0, math.sqrt(area / aspect))
    top, left = rng.uniform() * (1 - h), rng.uniform() * (1 - w)
    box = (left * width, top * height, (left + w) * width, (top + h) * height)
    out = img.resize((side, side), Image.Resampling.BILINEAR, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else out


class ShardEpoch(torch.utils.data.IterableDataset):
    """One pass over a split, batched in the worker: ``(uint8 images, labels, images skipped)``.

    ``seed`` None reads in index order (the test split); otherwise shards are permuted by ``seed``,
    dealt to workers round-robin, and each worker shuffles through a buffer seeded by (seed, worker).
    The DataLoader takes batches from workers in turn, so the epoch is a function of the seed and the
    number of workers.
    """

    def __init__(
        self,
        reader: Reader,
        index: SplitIndex,
        how: Decoding,
        batch_size: int,
        seed: int | None,
        buffer: int,
    ) -> None:
        self.reader, self.index, self.how = reader, index, how
        self.batch_size, self.seed, self.buffer = batch_size, seed, buffer

    def _rows(self, shard: int) -> range:
        # The index is in reading order, so a shard's rows are one contiguous run.
        lo, hi = np.searchsorted(self.index.shard, [shard, shard + 1])
        return range(int(lo), int(hi))

    def _encoded(self, shards: list[int]) -> Iterator[tuple[Any, int, str]]:
        for shard in shards:
            rows = self._rows(shard)
            for row, encoded in zip(rows, self.reader.scan(self.index, rows), strict=True):
                yield encoded, int(self.index.label[row]), self.reader.where(self.index, row)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        shards = np.arange(len(self.index.shards))
        rng = None
        if self.seed is not None:
            shards = np.random.default_rng(self.seed).permutation(shards)
            rng = np.random.default_rng([self.seed, worker])
        samples = self._encoded([int(s) for s in shards[worker::workers]])
        if rng is not None:
            samples = _buffer_shuffle(samples, self.buffer, rng)
        xs: list[np.ndarray] = []
        ys: list[int] = []
        skipped = 0
        for blob, label, where in samples:
            pixels = decode(blob, self.how, where, rng, self.reader.open)
            if pixels is None:
                skipped += 1
                continue
            xs.append(pixels)
            ys.append(label)
            if len(xs) == self.batch_size:
                yield torch.from_numpy(np.stack(xs)), torch.tensor(ys), skipped
                xs, ys, skipped = [], [], 0
        if xs or skipped:
            x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, dtype=torch.uint8)
            yield x, torch.tensor(ys, dtype=torch.int64), skipped


def read_pixels(
    reader: Reader, index: SplitIndex, rows: np.ndarray, how: Decoding, threads: int
) -> np.ndarray:
    """uint8 ``(len(rows), C, H, W)`` images at ``rows`` of ``index``, read in one request per shard
    and decoded in ``threads`` threads; an image that does not decode is an error naming it."""
    if not len(rows):
        return np.zeros((0, how.channels, how.resolution, how.resolution), dtype=np.uint8)
    blobs = reader.read(index, rows)

    def one(i: int) -> np.ndarray:
        where = reader.where(index, int(rows[i]))
        return decode(blobs[i], how, where, opener=reader.open)  # type: ignore[return-value]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return np.stack(list(pool.map(one, range(len(rows)))))


def _buffer_shuffle(
    samples: Iterator[tuple[Any, int, str]], size: int, rng: np.random.Generator
) -> Iterator[tuple[Any, int, str]]:
    """WebDataset's shuffle: fill a buffer, then emit a random element and put the next in its place."""
    buffer: list[tuple[Any, int, str]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)  # type: ignore[arg-type]
    yield from buffer


class CardShape:
    """The shape of the real data as its card records it (both kinds of real data have a ``card``)."""

    card: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.card["classes"])

    @property
    def channels(self) -> int:
        return self.card["channels"]

    @property
    def resolution(self) -> int:
        return self.card["resolution"]


@dataclass
class StreamedDataset(CardShape):
    """The real data of a streamed dataset: the same interface as
    :class:`condense.prepare.PreparedDataset` except that it has no ``train_x``/``test_x``."""

    card: dict[str, Any]
    indexes: dict[str, SplitIndex]
    readers: dict[str, Reader]
    workers: int
    buffer: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    skipped: dict[str, int] = field(default_factory=lambda: {"train": 0, "test": 0})
    """Images that did not decode in this object's epochs (``on_corrupt: skip``)."""
    whitening: zca.ZCA | None = None
    """MTT's ZCA whitening (``dataset.zca``), fitted by the dataset stage; applied per batch."""
    streamed: bool = True
    on_device: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """What every batch needs on the device, copied there once: the labels, the normalisation."""

    @property
    def train_y(self) -> torch.Tensor:
        return self._labels("train")

    @property
    def test_y(self) -> torch.Tensor:
        return self._labels("test")

    def _labels(self, split: str) -> torch.Tensor:
        """A split's labels on the device, copied there once (not on every access)."""
        if split not in self.on_device:
            self.on_device[split] = devices.upload(torch.from_numpy(self.indexes[split].label), self.device)
        return self.on_device[split]

    @property
    def train_x(self) -> torch.Tensor:
        raise DatasetError(
            "this step reads the whole training split into memory, which a streamed dataset never "
            "does; read it by data.images(idx) or data.batches(...), or set dataset.load: memory"
        )

    test_x = train_x

    def decoding(self, on_corrupt: str | None = None) -> Decoding:
        return Decoding(
            self.channels,
            self.resolution,
            self.card["transform"],
            on_corrupt or self.card["on_corrupt"],
        )

    def to(self, device: torch.device | str) -> StreamedDataset:
        """The same stream delivering its batches on ``device`` (this object when it does already)."""
        device = torch.device(device)
        if device == self.device:
            return self
        whitening = self.whitening
        if whitening is not None:  # applied to every batch: kept where the batches are
            moved = {k: getattr(whitening, k).to(device) for k in ("mean", "transform", "inverse")}
            whitening = zca.ZCA(**moved)
        return dataclasses.replace(self, device=device, whitening=whitening, on_device={})

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels to network inputs on the device (normalised, or whitened like the in-memory
        path), in the standard (contiguous NCHW) layout: decoded images arrive channels-last, and a
        convolution's rounding depends on the layout."""
        x = devices.upload(pixels, self.device).contiguous().float() / 255.0
        if self.whitening is not None:
            return zca.apply_zca(x, self.whitening)
        if "mean" not in self.on_device:
            shape = (1, -1, 1, 1)
            self.on_device["mean"] = devices.upload(torch.tensor(self.card["mean"]).view(shape), self.device)
            self.on_device["std"] = devices.upload(torch.tensor(self.card["std"]).view(shape), self.device)
        return (x - self.on_device["mean"]) / self.on_device["std"]

    def pixels(self, idx: torch.Tensor | np.ndarray, split: str = "train") -> np.ndarray:
        """uint8 ``(n, C, H, W)`` images at ``idx``, read by byte range (or row) and decoded in
        threads. A draw must get what it asked for, so an image that does not decode is an error here."""
        rows = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        how = self.decoding("error")
        return read_pixels(self.readers[split], self.indexes[split], rows, how, self.workers)

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """Network inputs of the training images at ``idx``, on the device."""
        return self.inputs(torch.from_numpy(self.pixels(idx)))

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``split`` as (inputs, labels) on the device: shuffled (shard order, then a
        buffer) when ``generator`` is given, in index order otherwise."""
        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        index = self.indexes[split]
        epoch = ShardEpoch(self.readers[split], index, self.decoding(), batch_size, seed, self.buffer)
        workers = min(self.workers, len(index.shards))
        loader = torch.utils.data.DataLoader(
            epoch,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
            pin_memory=self.device.type == "cuda",  # so the copy to the GPU does not block
        )
        for pixels, labels, skipped in loader:
            self.skipped[split] += skipped
            if len(labels):
                yield self.inputs(pixels), devices.upload(labels, self.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()
        if self.whitening is not None:
            return zca.invert_zca(x, self.whitening).clamp(0, 1)
        mean = torch.tensor(self.card["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(self.card["std"]).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)


def channel_stats(
    reader: Reader, index: SplitIndex, rows: np.ndarray, how: Decoding, chunk: int = 256
) -> tuple[int, list[float], list[float]]:
    """(channels, mean, std) on [0, 1] of the training images at ``rows``: one channel when every one
    of them is grayscale by its mode (the in-memory path's rule), float64 sums over chunks."""
    from condense.datasets.common import GRAY_MODES

    total, squares = np.zeros(3), np.zeros(3)
    pixels_seen = 0
    gray = True
    rgb = Decoding(3, how.resolution, how.transform, "error")
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        blobs = reader.read(index, part)
        x = []
        for row, blob in zip(part, blobs, strict=True):
            where = reader.where(index, int(row))
            try:
                with reader.open(blob) as im:
                    gray = gray and im.mode in GRAY_MODES
            except (OSError, ValueError, SyntaxError) as err:
                raise DatasetError(f"cannot decode image {where}: {err}") from None
            x.append(decode(blob, rgb, where, opener=reader.open))
        pixels = np.stack(x).astype(np.float64) / 255.0
        total += pixels.sum(axis=(0, 2, 3))
        squares += (pixels * pixels).sum(axis=(0, 2, 3))
        pixels_seen += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    mean = total / pixels_seen
    std = np.sqrt(np.maximum(squares / pixels_seen - mean * mean, 0.0))
    if gray:
        return 1, mean[:1].tolist(), std[:1].tolist()
    return 3, mean.tolist(), std.tolist()


def locate(cfg: DatasetConfig) -> dict[str, Any]:
    """Where ``cfg``'s data is, as the dataset stage records it: ``urls`` (each split's shards) or
    ``hf`` (the settings that open a Hugging Face dataset)."""
    if cfg.source == "huggingface":
        from condense.datasets.huggingface import LOCATION

        return {"hf": cfg.model_dump(include=set(LOCATION))}
    from condense.datasets.shards import shard_urls

    return {"urls": dict(zip(SPLITS, shard_urls(cfg), strict=True))}


def readers(source: str, indexes: dict[str, SplitIndex], located: dict[str, Any]) -> dict[str, Reader]:
    """Each split's reader of the data ``located`` (:func:`locate`): shards are matched to the index by
    name, a Hugging Face split is opened by its settings."""
    if source == "huggingface":
        from condense.datasets.huggingface import RowReader

        cfg = DatasetConfig(source="huggingface", **located["hf"])
        return {split: RowReader(cfg, split) for split in SPLITS}
    return {
        split: TarReader(resolve_shards(indexes[split], located["urls"][split], split)) for split in SPLITS
    }


def open_streamed(
    path: Path, meta: dict[str, Any], cfg: DatasetConfig | None, whitening: zca.ZCA | None = None
) -> StreamedDataset:
    """The streamed dataset whose index the dataset stage wrote at ``path`` (``meta``: its metadata;
    ``whitening``: its fitted ZCA when ``dataset.zca``).

    The data is read where ``cfg`` says it is now (shards are looked up by name, so they may move
    after indexing), or where it was when indexed.
    """
    from condense.store import load_arrays

    arrays = load_arrays(path)
    card = meta["card"]
    indexes = {split: SplitIndex.from_arrays(arrays, split, meta["shards"][split]) for split in SPLITS}
    found = readers(card["source"], indexes, locate(cfg) if cfg else meta)
    return StreamedDataset(card, indexes, found, card["workers"], card["shuffle_buffer"], whitening=whitening)
