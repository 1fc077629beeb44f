"""What every source shares: the decoded dataset, its checks, decoding and hashing helpers."""

from __future__ import annotations

import difflib
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from condense.config import DatasetConfig
from condense.errors import DatasetError

GRAY_MODES = frozenset({"1", "L", "LA"})
_FORMAT_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A kind of dataset source: how to decode it, and how to fingerprint it without decoding."""

    name: str
    load: Callable[[DatasetConfig], RawDataset]
    fingerprint: Callable[[DatasetConfig], str | None]
    """sha256 hex of the content read without decoding (with :func:`settings_hash` mixed in), or
    None when only decoding tells (then the decoded arrays are hashed)."""


@dataclass(frozen=True)
class RawDataset:
    """A decoded dataset: uint8 ``(N, C, H, W)`` images, int64 labels, class names (index = label)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def content_fingerprint(raw: RawDataset) -> str:
    """sha256 hex over the decoded arrays (bytes, shapes, dtypes) and class names."""
    h = hashlib.sha256(b"condense.datasets.content\0")
    for array in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        hash_array(h, array)
    h.update(json.dumps(list(raw.classes)).encode())
    return h.hexdigest()


def settings_hash(cfg: DatasetConfig) -> Any:
    settings: dict[str, Any] = {
        "format": _FORMAT_VERSION,
        "source": cfg.source,
        "resolution": cfg.resolution,
        "train_per_class": cfg.train_per_class,
    }
    if cfg.classes is not None:  # only when set: the fingerprints of every existing config stay
        settings["classes"] = list(cfg.classes)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + b"\0")


def hash_array(h: Any, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode() + b"\0")
    h.update(memoryview(array).cast("B"))


def hash_file(h: Any, name: str, path: Path) -> None:
    # Length-prefixed name and size so that no two different file lists hash the same byte stream.
    encoded = name.encode()
    h.update(len(encoded).to_bytes(8, "little") + encoded)
    try:
        h.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None


def first_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` samples of each class, in reading order."""
    if limit is None:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")  # stable: reading order within each class
    sorted_labels = labels[order]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.flatnonzero(rank < limit)


def open_image(src: bytes | Path | Image.Image) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)


IMAGENET_CROP = 0.875
"""ImageNet's evaluation transform resizes the short side to ``resolution / 0.875`` (256 for 224)."""


def fit_image(img: Image.Image, resolution: int | None, transform: str = "resize") -> Image.Image:
    """The image at the dataset's size: squashed to ``resolution`` squared (``resize``), or its short
    side resized to ``resolution / 0.875`` (``imagenet``) or to ``resolution`` (``center``, MTT's
    ImageNet subsets) and the centre cut out; PIL bilinear."""
    if resolution is None:
        return img
    if transform in ("imagenet", "center"):
        width, height = img.size
        short = round(resolution / IMAGENET_CROP) if transform == "imagenet" else resolution
        scale = short / min(width, height)
        size = (max(short, round(width * scale)), max(short, round(height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))
    if img.size != (resolution, resolution):
        return img.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return img


def decode_images(
    sources: Sequence[bytes | Path | Image.Image],
    where: Callable[[int], str],
    resolution: int | None,
    transform: str = "resize",
) -> np.ndarray:
    """Decode encoded images into one ``(N, C, H, W)`` uint8 array.

    All images share one channel layout: grayscale (C=1) if every image is grayscale, else RGB.
    Gray images are written into all three channels as they go (which is exactly PIL's L->RGB), so a
    single pass suffices and the gray case keeps just channel 0 at the end.
    """
    out: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    first = 0
    all_gray = True
    for i, src in enumerate(sources):
        try:
            with open_image(src) as im:
                gray = im.mode in GRAY_MODES
                target = "L" if gray else "RGB"
                img = im if im.mode == target else im.convert(target)
                img = fit_image(img, resolution, transform)
                pixels = np.asarray(img)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DatasetError(f"cannot decode image {where(i)}: {err}") from None
        if out is None:
            size, first = img.size, i
            out = np.empty((len(sources), 3, size[1], size[0]), dtype=np.uint8)
        elif img.size != size:
            raise DatasetError(
                f"images differ in size: {size[0]}x{size[1]} ({where(first)}) vs {img.size[0]}x{img.size[1]} "
                f"({where(i)}); set dataset.resolution to resize them"
            )
        if gray:
            out[i] = pixels[None]
        else:
            out[i] = pixels.transpose(2, 0, 1)
            all_gray = False
    if out is None:
        return np.zeros((0, 1, resolution or 0, resolution or 0), dtype=np.uint8)
    return np.ascontiguousarray(out[:, :1]) if all_gray else out


def resize_array(x: np.ndarray, resolution: int | None) -> np.ndarray:
    """Resize already-decoded ``(N, C, H, W)`` uint8 images with PIL bilinear, like decoded files."""
    if resolution is None or x.shape[2:] == (resolution, resolution):
        return x
    images = [Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)) for img in x]
    return decode_images(images, lambda i: f"#{i}", resolution)


def finish(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: list[str],
) -> RawDataset:
    """Shared checks: every class has training images, labels fit the classes, channels agree."""
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    if len(train_y) == 0:
        raise DatasetError("the training split has no images")
    if len(test_y) == 0:
        raise DatasetError("the test split has no images")
    for split, y in (("train", train_y), ("test", test_y)):
        if y.min() < 0 or y.max() >= len(classes):
            bad = int(y.min() if y.min() < 0 else y.max())
            raise DatasetError(
                f"{split} label {bad} is outside the {len(classes)} classes 0..{len(classes) - 1}"
            )
    counts = np.bincount(train_y, minlength=len(classes))
    if (counts == 0).any():
        missing = int(np.flatnonzero(counts == 0)[0])
        raise DatasetError(f"class {classes[missing]} has no training images")
    tested = np.bincount(test_y, minlength=len(classes))
    if (tested == 0).any():
        missing = int(np.flatnonzero(tested == 0)[0])
        raise DatasetError(
            f"class {classes[missing]} has no test images: test accuracy would leave it out; add some"
        )
    # A gray split next to an RGB one (possible only for array sources) becomes RGB like the other.
    if train_x.shape[1] != test_x.shape[1]:
        train_x, test_x = (np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a for a in (train_x, test_x))
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DatasetError(
            f"train images are {train_x.shape[3]}x{train_x.shape[2]} but test images are "
            f"{test_x.shape[3]}x{test_x.shape[2]}; set dataset.resolution to resize them"
        )
    return RawDataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=list(classes))


def dataset_root(cfg: DatasetConfig, needs: str = "dataset.path") -> Path:
    """``dataset.path`` as an existing directory; ``needs`` says what to set when it is missing."""
    if not cfg.path:
        raise DatasetError(f"source={cfg.source} needs {needs}")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a directory: {root}")
    return root


def sample_per_class(
    labels: torch.Tensor, num_classes: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of ``k`` random samples of each class, class-major (k of class 0, then class 1, ...)."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picks)


def select_classes(
    ids: Sequence[str], wanted: Sequence[str] | None, where: str, names: Sequence[str] | None = None
) -> list[int] | None:
    """The positions of ``wanted`` (``dataset.classes``) among a source's classes, in ``wanted``'s
    order: each entry matches a class id (a folder name, a wnid, a shard list's entry), else a class
    name (``names``, where they differ). None when ``wanted`` is None (every class, as it is)."""
    if wanted is None:
        return None
    by_id = {c: i for i, c in enumerate(ids)}
    by_name: dict[str, int] = {}
    for i, c in enumerate(names or ()):
        by_name.setdefault(c, i)
    picks: list[int] = []
    for entry in wanted:
        found = by_id.get(entry, by_name.get(entry))
        if found is None:
            known = list(by_id) + [n for n in by_name if n not in by_id]
            close = difflib.get_close_matches(entry, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            shown = ", ".join(list(ids)[:5]) + (f", ... ({len(ids)} classes)" if len(ids) > 5 else "")
            raise DatasetError(
                f"dataset.classes: {entry!r} is not a class of {where}{hint}; its classes: {shown}"
            )
        if found in picks:
            raise DatasetError(f"dataset.classes names class {entry!r} of {where} twice")
        picks.append(found)
    return picks


def relabel(labels: np.ndarray, picks: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, their new labels): the rows of the picked classes, in reading order, class
    ``picks[i]`` relabelled ``i``. Every row, labels unchanged, when ``picks`` is None."""
    labels = np.asarray(labels, dtype=np.int64)
    if picks is None:
        return np.arange(len(labels)), labels
    mapping = np.full(max(int(labels.max(initial=-1)), max(picks)) + 1, -1, dtype=np.int64)
    mapping[picks] = np.arange(len(picks))
    new = mapping[np.clip(labels, 0, len(mapping) - 1)]
    new[labels < 0] = -1
    rows = np.flatnonzero(new >= 0)
    return rows, new[rows]


def subset_raw(raw: RawDataset, cfg: DatasetConfig, where: str) -> RawDataset:
    """``raw`` restricted to ``cfg.classes`` (relabelled 0..k-1 in that order); ``raw`` when unset.
    For sources decoded whole anyway (torchvision, digits); the others select before decoding."""
    picks = select_classes(raw.classes, cfg.classes, where)
    if picks is None:
        return raw
    train_rows, train_y = relabel(raw.train_y, picks)
    test_rows, test_y = relabel(raw.test_y, picks)
    return finish(
        raw.train_x[train_rows], train_y, raw.test_x[test_rows], test_y, [raw.classes[i] for i in picks]
    )
