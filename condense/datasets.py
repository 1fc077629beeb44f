"""Real datasets: read a source (sklearn digits, WebDataset shards, an image folder, torchvision) into
uint8 arrays, and fingerprint it so the dataset stage can be cached.

Every source ends up as a :class:`RawDataset` of ``(N, C, H, W)`` uint8 images (C=1 grayscale, C=3
RGB) and int64 labels. Problems a user can fix are raised as :class:`~condense.errors.DatasetError`
with a one-line message that names the file, shard or class at fault.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from condense.config import DatasetConfig
from condense.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""Files an image folder reads; anything else in it (READMEs, .DS_Store) is ignored."""
SAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
"""WebDataset sample keys holding the image, tried in this order."""
TORCHVISION_ROOT = "data/torchvision"

# PIL modes that carry only luminance; they are stored as one channel, everything else as RGB.
_GRAY_MODES = frozenset({"1", "L", "LA"})
# Bump when decoding changes in a way that changes the arrays of an unchanged source.
_FORMAT_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RawDataset:
    """A decoded dataset: uint8 ``(N, C, H, W)`` images, int64 labels, class names (index = label)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


# --------------------------------------------------------------------------------------------------
# Public API


def load_source(cfg: DatasetConfig) -> RawDataset:
    """Read and decode the real data (train and test splits), applying resolution and train_per_class."""
    loaders: dict[str, Callable[[DatasetConfig], RawDataset]] = {
        "digits": _load_digits,
        "webdataset": _load_webdataset,
        "folder": _load_folder,
        "torchvision": _load_torchvision,
    }
    return loaders[cfg.source](cfg)


def source_fingerprint(cfg: DatasetConfig) -> str | None:
    """sha256 hex of the source's content, computed without decoding; None when only decoding tells.

    Digits: a hash of sklearn's arrays. Local WebDataset shards and image folders: sha256 over
    (relative path, bytes) of every file :func:`load_source` would read, in reading order. Remote
    shards and torchvision datasets: None (use :func:`content_fingerprint` after loading). The
    settings that change the decoded arrays (source, resolution, train_per_class) are mixed in.
    """
    h = _settings_hash(cfg)
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        _hash_array(h, digits.images)
        _hash_array(h, digits.target)
        return h.hexdigest()
    if cfg.source == "folder":
        layout = _folder_layout(_dataset_root(cfg))
        for path, _ in layout.train + layout.test:
            _hash_file(h, path.relative_to(layout.root).as_posix(), path)
        return h.hexdigest()
    if cfg.source == "webdataset":
        train_urls, test_urls = _shard_urls(cfg)
        if not all(_local_path(u) is not None for u in train_urls + test_urls):
            return None
        for split, urls in (("train", train_urls), ("test", test_urls)):
            for url in urls:
                path = _local_path(url)
                assert path is not None
                # The basename, not the full path: moving the dataset must not change its fingerprint.
                _hash_file(h, f"{split}/{path.name}", path)
        return h.hexdigest()
    return None


def content_fingerprint(raw: RawDataset) -> str:
    """sha256 hex over the decoded arrays (bytes, shapes, dtypes) and class names."""
    h = hashlib.sha256(b"condense.datasets.content\0")
    for array in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        _hash_array(h, array)
    h.update(json.dumps(list(raw.classes)).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Hashing helpers


def _settings_hash(cfg: DatasetConfig) -> Any:
    settings = {
        "format": _FORMAT_VERSION,
        "source": cfg.source,
        "resolution": cfg.resolution,
        "train_per_class": cfg.train_per_class,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + b"\0")


def _hash_array(h: Any, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode() + b"\0")
    h.update(memoryview(array).cast("B"))


def _hash_file(h: Any, name: str, path: Path) -> None:
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


# --------------------------------------------------------------------------------------------------
# Shared decoding steps


def _first_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` samples of each class, in reading order."""
    if limit is None:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")  # stable: reading order within each class
    sorted_labels = labels[order]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.flatnonzero(rank < limit)


def _open_image(src: bytes | Path | Image.Image) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)


def _decode_images(
    sources: Sequence[bytes | Path | Image.Image],
    where: Callable[[int], str],
    resolution: int | None,
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
            with _open_image(src) as im:
                gray = im.mode in _GRAY_MODES
                target = "L" if gray else "RGB"
                img = im if im.mode == target else im.convert(target)
                if resolution is not None and img.size != (resolution, resolution):
                    img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
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


def _resize_array(x: np.ndarray, resolution: int | None) -> np.ndarray:
    """Resize already-decoded ``(N, C, H, W)`` uint8 images with PIL bilinear, like decoded files."""
    if resolution is None or x.shape[2:] == (resolution, resolution):
        return x
    images = [Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)) for img in x]
    return _decode_images(images, lambda i: f"#{i}", resolution)


def _finish(
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
    # A gray split next to an RGB one (possible only for array sources) becomes RGB like the other.
    if train_x.shape[1] != test_x.shape[1]:
        train_x, test_x = (np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a for a in (train_x, test_x))
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DatasetError(
            f"train images are {train_x.shape[3]}x{train_x.shape[2]} but test images are "
            f"{test_x.shape[3]}x{test_x.shape[2]}; set dataset.resolution to resize them"
        )
    return RawDataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=list(classes))


def _dataset_root(cfg: DatasetConfig) -> Path:
    if not cfg.path:
        raise DatasetError(f"source={cfg.source} needs dataset.path")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a directory: {root}")
    return root


# --------------------------------------------------------------------------------------------------
# digits


def _load_digits(cfg: DatasetConfig) -> RawDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    # Sorted: "file order" is sklearn's order, whatever order the split happened to return.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_idx = train_idx[_first_per_class(y[train_idx], cfg.train_per_class)]
    return _finish(
        _resize_array(x[train_idx], cfg.resolution),
        y[train_idx],
        _resize_array(x[test_idx], cfg.resolution),
        y[test_idx],
        [str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------------------------------
# webdataset


def _local_path(url: str) -> Path | None:
    """The file behind a local shard URL, None for remote (http, pipe:, s3, ...) ones."""
    if url.startswith("pipe:"):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    # One-letter "schemes" are Windows drive letters, i.e. local paths.
    if parsed.scheme and len(parsed.scheme) > 1:
        return None
    return Path(url).expanduser()


def _dir_shards(root: Path, prefixes: Sequence[str]) -> list[str]:
    for prefix in prefixes:
        found = sorted({p for ext in ("tar", "tar.gz", "tgz") for p in root.glob(f"{prefix}-*.{ext}")})
        if found:
            return [str(p) for p in found]
    return []


def _shard_urls(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    """Expanded train and test shard URLs: explicit URL patterns first, else the shards in ``path``."""
    root = _dataset_root(cfg) if cfg.path and not (cfg.train_urls and cfg.test_urls) else None
    splits = []
    for split, pattern, prefixes in (
        ("train", cfg.train_urls, ("train",)),
        ("test", cfg.test_urls, ("test", "val")),
    ):
        if pattern:
            # Imported here: webdataset imports torch, too slow for fingerprinting a shard directory.
            from webdataset.shardlists import expand_urls

            urls = expand_urls(pattern)
            if not urls:
                raise DatasetError(f"dataset.{split}_urls {pattern!r} expands to no shards")
        elif root is not None:
            urls = _dir_shards(root, prefixes)
            if not urls:
                names = " or ".join(f"{p}-*.tar[.gz]" for p in prefixes)
                raise DatasetError(f"no {split} shards ({names}) in {root}")
        else:
            raise DatasetError(
                f"source=webdataset needs dataset.path (a shard directory) or dataset.{split}_urls"
            )
        for url in urls:
            path = _local_path(url)
            if path is not None and not path.is_file():
                raise DatasetError(f"shard not found: {url}")
        splits.append(urls)
    return splits[0], splits[1]


def _error_reason(err: BaseException) -> str:
    # webdataset appends the stream and URL to exception args and " @ <stream>" to the message; keep
    # only the original first line.
    if isinstance(err, OSError) and err.strerror:  # args[0] of an OSError is its errno
        return f"{type(err).__name__}: {err.strerror}"
    reason = str(err.args[0]) if err.args else ""
    reason = reason.split(" @ ")[0].strip().splitlines()[0] if reason.strip() else ""
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


class _ClosingOpener:
    """Wraps webdataset's shard opener to close each shard's stream as soon as it has been read.

    webdataset 1.0 leaves shard streams to the garbage collector: a ResourceWarning per local file,
    and for ``pipe:``/http shards the download command's failure is raised from ``close()`` at some
    later point, far from the shard it concerns. Closing here keeps that failure, to be reported with
    the shard's name.
    """

    def __init__(self, opener: Callable[[Any], Iterator[dict[str, Any]]]) -> None:
        self.opener = opener
        self.streams: list[Any] = []
        self.errors: list[str] = []

    def __call__(self, urls: Any) -> Iterator[dict[str, Any]]:
        for source in self.opener(urls):
            self.streams.append(source["stream"])
            try:
                yield source
            finally:
                self.close()

    def close(self) -> None:
        while self.streams:
            stream = self.streams.pop()
            try:
                stream.close()
            except Exception as err:  # a pipe (curl, ...) raises its command's exit status on close
                status = getattr(stream, "status", None)
                self.errors.append(f"command exited with status {status}" if status else _error_reason(err))


def _shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard; any read/parse failure becomes a DatasetError naming it."""
    import webdataset as wds

    local = _local_path(url)
    # One pipeline per shard, so a failure can be pinned on the shard being read. No node/worker
    # splitter: this process loads the whole dataset even under torchrun or in a DataLoader worker.
    dataset = wds.WebDataset(
        [url if local is None else str(local)],
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
    )
    opener = None
    for i, stage in enumerate(dataset.pipeline):
        if isinstance(stage, wds.cache.StreamingOpen):
            opener = dataset.pipeline[i] = _ClosingOpener(stage)
    samples = iter(dataset)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as err:  # tarfile, gzip, zlib, network: all mean this shard cannot be read
            reason = _error_reason(err)
            if opener is not None:
                opener.close()
                # "empty file" from tarfile says less than the download command's exit status.
                reason = f"{opener.errors[0]} ({reason})" if opener.errors else reason
            raise DatasetError(f"corrupt or unreadable shard {url}: {reason}") from None
        yield sample
    if opener is not None:
        opener.close()
        if opener.errors:  # a download that failed on a tar block boundary reads as a clean end
            raise DatasetError(f"corrupt or unreadable shard {url}: {opener.errors[0]}")


def _read_split(urls: list[str]) -> tuple[list[bytes], np.ndarray, list[tuple[str, str]]]:
    blobs: list[bytes] = []
    labels: list[int] = []
    where: list[tuple[str, str]] = []
    for url in urls:
        for sample in _shard_samples(url):
            key = sample.get("__key__", "?")
            image_key = next((k for k in SAMPLE_IMAGE_KEYS if k in sample), None)
            if image_key is None:
                keys = ", ".join(k for k in sample if not k.startswith("__")) or "none"
                raise DatasetError(
                    f"sample {key} in {url} has no image (jpg, jpeg or png key; it has: {keys})"
                )
            if "cls" not in sample:
                raise DatasetError(f"sample {key} in {url} has no 'cls' key")
            raw = sample["cls"]
            try:
                label = int(raw.decode() if isinstance(raw, bytes) else raw)
            except (UnicodeDecodeError, ValueError, TypeError):
                raise DatasetError(f"sample {key} in {url} has a non-integer 'cls': {raw!r:.40}") from None
            if label < 0:
                raise DatasetError(f"sample {key} in {url} has a negative 'cls': {label}")
            blobs.append(sample[image_key])
            labels.append(label)
            where.append((key, url))
    return blobs, np.asarray(labels, dtype=np.int64), where


def _load_webdataset(cfg: DatasetConfig) -> RawDataset:
    train_urls, test_urls = _shard_urls(cfg)
    splits = []
    for urls in (train_urls, test_urls):
        blobs, labels, where = _read_split(urls)
        if not blobs:
            shown = ", ".join(urls[:3]) + (f", ... ({len(urls)} shards)" if len(urls) > 3 else "")
            raise DatasetError(f"no samples in shards {shown}")
        splits.append((blobs, labels, where))
    (train_blobs, train_y, train_where), (test_blobs, test_y, test_where) = splits
    keep = _first_per_class(train_y, cfg.train_per_class)
    train_blobs = [train_blobs[i] for i in keep]
    train_where = [train_where[i] for i in keep]
    train_y = train_y[keep]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    # Check before decoding: decoding 50k images only to report a missing class wastes seconds.
    counts = np.bincount(train_y, minlength=num_classes)
    if (counts == 0).any():
        raise DatasetError(f"class {int(np.flatnonzero(counts == 0)[0])} has no training images")
    # Decoded together so both splits get the same channel layout and size check.
    where = train_where + test_where
    x = _decode_images(
        train_blobs + test_blobs, lambda i: "sample {} in {}".format(*where[i]), cfg.resolution
    )
    n = len(train_blobs)
    return _finish(x[:n], train_y, x[n:], test_y, [str(i) for i in range(num_classes)])


# --------------------------------------------------------------------------------------------------
# folder


@dataclass(frozen=True)
class _FolderLayout:
    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_layout(root: Path) -> _FolderLayout:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"image folder {root} has no train/ split (expected train/<class>/<image>)")
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_dir is None:
        raise DatasetError(f"image folder {root} has no test/ or val/ split (expected test/<class>/<image>)")
    class_dirs = _class_dirs(train_dir)
    if not class_dirs:
        raise DatasetError(f"no class folders in {train_dir}")
    classes = [d.name for d in class_dirs]
    train: list[tuple[Path, int]] = []
    for label, d in enumerate(class_dirs):
        files = _image_files(d)
        if not files:
            raise DatasetError(
                f"class {d.name} has no training images in {d} ({', '.join(IMAGE_EXTENSIONS)})"
            )
        train += [(p, label) for p in files]
    index = {name: i for i, name in enumerate(classes)}
    test: list[tuple[Path, int]] = []
    for d in _class_dirs(test_dir):
        if d.name not in index:
            raise DatasetError(
                f"test class {d.name!r} ({d}) is not a training class; classes are the folders in {train_dir}"
            )
        test += [(p, index[d.name]) for p in _image_files(d)]
    if not test:
        raise DatasetError(f"no test images in {test_dir} (expected {test_dir.name}/<class>/<image>)")
    return _FolderLayout(root=root, classes=classes, train=train, test=test)


def _load_folder(cfg: DatasetConfig) -> RawDataset:
    layout = _folder_layout(_dataset_root(cfg))
    train_y = np.asarray([label for _, label in layout.train], dtype=np.int64)
    keep = _first_per_class(train_y, cfg.train_per_class)
    files = [layout.train[i][0] for i in keep] + [p for p, _ in layout.test]
    x = _decode_images(files, lambda i: str(files[i]), cfg.resolution)
    n = len(keep)
    test_y = np.asarray([label for _, label in layout.test], dtype=np.int64)
    return _finish(x[:n], train_y[keep], x[n:], test_y, layout.classes)


# --------------------------------------------------------------------------------------------------
# torchvision


def _one_line(err: BaseException, limit: int = 300) -> str:
    # The user sees one line: join a multi-line message (torchvision lists one error per mirror).
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()).replace(":; ", ": ")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _as_uint8_images(data: Any) -> np.ndarray | None:
    """``(N, C, H, W)`` uint8 from a dataset's ``.data`` array/tensor, None if it is not one."""
    if not (isinstance(data, np.ndarray) or hasattr(data, "numpy")):
        return None
    x = np.asarray(data)
    if x.dtype != np.uint8:
        return None
    if x.ndim == 3:  # (N, H, W) grayscale, e.g. MNIST
        return x[:, None]
    if x.ndim == 4 and x.shape[3] in (1, 3):  # (N, H, W, C), e.g. CIFAR10
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim == 4 and x.shape[1] in (1, 3):  # (N, C, H, W), e.g. SVHN
        return x
    return None


def _torchvision_split(
    dataset: Any, resolution: int | None, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    x = _as_uint8_images(getattr(dataset, "data", None))
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = getattr(dataset, "labels", None)
    if x is not None and targets is not None and len(targets) == len(x):
        y = np.asarray(targets, dtype=np.int64).reshape(-1)
        keep = _first_per_class(y, limit)
        return _resize_array(x[keep], resolution), y[keep]
    # No usable arrays: go through the dataset's own __getitem__ (PIL image, int target).
    images, labels = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        if not isinstance(image, Image.Image):
            raise DatasetError(
                f"torchvision dataset item {i} is a {type(image).__name__}, expected a PIL image; "
                "it must be built without a transform"
            )
        images.append(image)
        labels.append(int(target))
    y = np.asarray(labels, dtype=np.int64)
    keep = _first_per_class(y, limit)
    return _decode_images([images[i] for i in keep], lambda i: f"#{keep[i]}", resolution), y[keep]


def _load_torchvision(cfg: DatasetConfig) -> RawDataset:
    try:
        import torchvision.datasets as tv_datasets
    except ImportError:
        raise DatasetError("source=torchvision needs torchvision: pip install torchvision") from None
    dataset_cls = getattr(tv_datasets, cfg.name, None)
    if not isinstance(dataset_cls, type):
        known = [
            n for n in dir(tv_datasets) if not n.startswith("_") and isinstance(getattr(tv_datasets, n), type)
        ]
        by_lower = {n.lower(): n for n in known}  # "mnist" should suggest MNIST
        close = [by_lower[n] for n in difflib.get_close_matches(cfg.name.lower(), list(by_lower), n=3)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DatasetError(
            f"unknown torchvision dataset {cfg.name!r}{hint}; dataset.name must be a class of "
            "torchvision.datasets, e.g. CIFAR10, CIFAR100, MNIST, FashionMNIST"
        )
    root = str(Path(cfg.path or TORCHVISION_ROOT).expanduser())
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_cls(root=root, train=train, download=True)
        except Exception as err:  # download, extraction or constructor errors, all shown as one line
            raise DatasetError(
                f"cannot load torchvision.datasets.{cfg.name}(root={root!r}, train={train}): {_one_line(err)}"
            ) from None
        splits.append(
            (dataset, _torchvision_split(dataset, cfg.resolution, cfg.train_per_class if train else None))
        )
    (train_ds, (train_x, train_y)), (_, (test_x, test_y)) = splits
    num_classes = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
    names = getattr(train_ds, "classes", None)
    if isinstance(names, (list, tuple)) and len(names) >= num_classes:
        classes = [str(c) for c in names]
    else:
        classes = [str(i) for i in range(num_classes)]
    return _finish(train_x, train_y, test_x, test_y, classes)
