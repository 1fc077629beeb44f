"""WebDataset shards (local, ``file://``, or any URL webdataset opens): ``jpg``/``png`` + ``cls``.

Class names: ``dataset.class_names``, else the shards' own list, :data:`CLASS_LIST` (one name per
line, index = ``cls``; ``condense data convert`` writes it) in ``dataset.path`` or beside the first
training shard, else the indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from condense.config import DatasetConfig
from condense.datasets.common import (
    RawDataset,
    Source,
    dataset_root,
    decode_images,
    finish,
    first_per_class,
    hash_file,
    relabel,
    select_classes,
    settings_hash,
)
from condense.datasets.index import SplitIndex, check_shard, index_split
from condense.errors import DatasetError

SAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
CLASS_LIST = "classes.txt"
"""The shards' class names, one per line in ``cls`` order, beside the shards."""


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


def shard_urls(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    """Expanded train and test shard URLs: explicit URL patterns first, else the shards in ``path``."""
    root = dataset_root(cfg) if cfg.path and not (cfg.train_urls and cfg.test_urls) else None
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


def _class_list_url(cfg: DatasetConfig) -> str | None:
    """Where the shards' :data:`CLASS_LIST` would be: in ``dataset.path`` when it holds the shards,
    else beside the first training shard; None for a ``pipe:`` shard."""
    train_urls = shard_urls(cfg)[0]
    first = train_urls[0]
    local = _local_path(first)
    if local is not None:
        return str(local.parent / CLASS_LIST)
    if first.startswith("pipe:"):
        return None
    return first.rsplit("/", 1)[0] + "/" + CLASS_LIST


def read_class_list(url: str) -> list[str] | None:
    """The names in a class list (one per line, index = ``cls``), None when there is no such file."""
    local = _local_path(url)
    try:
        if local is not None:
            if not local.is_file():
                return None
            text = local.read_text(encoding="utf-8")
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                return None
            with fs.open(path, "rb") as f:
                text = f.read().decode("utf-8")
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f"cannot read the class list {url}: {err}") from None
    names = [line.strip() for line in text.rstrip("\n").split("\n")]
    if not names or "" in names:
        raise DatasetError(f"class list {url} has an empty line: one class name per line, in cls order")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DatasetError(f"class list {url} names {twice!r} twice")
    return names


def listed_classes(cfg: DatasetConfig) -> tuple[list[str], str] | None:
    """The shards' own class list and its URL, None when they have none."""
    url = _class_list_url(cfg)
    if url is None:
        return None
    names = read_class_list(url)
    return None if names is None else (names, url)


def shard_classes(cfg: DatasetConfig) -> tuple[list[str] | None, list[int] | None, str]:
    """(every class name, index = ``cls``; the ``cls`` values ``dataset.classes`` keeps, in its
    order, None for all; what named them). Names are ``dataset.class_names``, else the shards'
    :data:`CLASS_LIST`, else None (the indices). ``dataset.classes`` picks by the list's entries,
    else by ``class_names``."""
    listed = listed_classes(cfg)
    what = "dataset.class_names" if cfg.class_names is not None else (listed[1] if listed else "")
    names = cfg.class_names if cfg.class_names is not None else (listed[0] if listed else None)
    if listed is not None and cfg.class_names is not None and len(listed[0]) != len(cfg.class_names):
        raise DatasetError(
            f"dataset.class_names names {len(cfg.class_names)} classes but {listed[1]} lists {len(listed[0])}"
        )
    if cfg.classes is None:
        return names, None, what
    if names is None:
        raise DatasetError(
            f"dataset.classes picks classes by name, but these shards have no {CLASS_LIST} (condense data "
            "convert writes one) and dataset.class_names is unset"
        )
    ids = listed[0] if listed is not None else names
    return names, select_classes(ids, cfg.classes, f"the shards ({what})", names), what


def kept_classes(cfg: DatasetConfig) -> list[str] | None:
    """The class names after ``dataset.classes`` (index = label), None when the shards name none."""
    names, picks, _ = shard_classes(cfg)
    return names if names is None or picks is None else [names[i] for i in picks]


def index_splits(cfg: DatasetConfig) -> dict[str, SplitIndex]:
    """Both splits' indexes for streaming (headers and labels only), restricted to ``dataset.classes``."""
    train_urls, test_urls = shard_urls(cfg)
    picks = shard_classes(cfg)[1] if cfg.classes is not None else None
    return {
        split: index_split(urls, cfg.on_corrupt).relabelled(picks)
        for split, urls in (("train", train_urls), ("test", test_urls))
    }


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
        if _local_path(url) is not None and not url.endswith((".gz", ".tgz")):
            check_shard(url)  # a gzip stream has its own end marker; a plain tar cut short does not
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


def load(cfg: DatasetConfig) -> RawDataset:
    train_urls, test_urls = shard_urls(cfg)
    splits = []
    for urls in (train_urls, test_urls):
        blobs, labels, where = _read_split(urls)
        if not blobs:
            shown = ", ".join(urls[:3]) + (f", ... ({len(urls)} shards)" if len(urls) > 3 else "")
            raise DatasetError(f"no samples in shards {shown}")
        splits.append((blobs, labels, where))
    (train_blobs, train_y, train_where), (test_blobs, test_y, test_where) = splits
    names, picks, what = shard_classes(cfg)
    top = int(np.argmax(train_y))
    if names is not None and train_y[top] >= len(names):
        raise DatasetError(
            "sample {} in {} has cls {}, but {} names {} classes".format(
                *train_where[top], int(train_y[top]), what, len(names)
            )
        )
    if picks is not None:
        assert names is not None
        names = [names[i] for i in picks]
        rows, train_y = relabel(train_y, picks)
        train_blobs, train_where = [train_blobs[i] for i in rows], [train_where[i] for i in rows]
        rows, test_y = relabel(test_y, picks)
        test_blobs, test_where = [test_blobs[i] for i in rows], [test_where[i] for i in rows]
        if not len(train_y) or not len(test_y):
            split = "training" if not len(train_y) else "test"
            raise DatasetError(f"the shards hold no {split} samples of the classes dataset.classes picks")
    keep = first_per_class(train_y, cfg.train_per_class)
    train_blobs = [train_blobs[i] for i in keep]
    train_where = [train_where[i] for i in keep]
    train_y = train_y[keep]
    # Checks before decoding: decoding 50k images only to report a bad label wastes seconds. The
    # classes are the named ones, else the training split's: a label past its sample count cannot be
    # a class index.
    top = int(np.argmax(train_y))
    if train_y[top] >= len(train_y):
        raise DatasetError(
            "sample {} in {} has cls {}: classes must be numbered 0..C-1, with C at most {} here".format(
                *train_where[top], int(train_y[top]), len(train_y)
            )
        )
    classes = names or [str(i) for i in range(int(train_y[top]) + 1)]
    num_classes = len(classes)
    counts = np.bincount(train_y, minlength=num_classes)
    if (counts == 0).any():
        raise DatasetError(f"class {classes[int(np.flatnonzero(counts == 0)[0])]} has no training images")
    outside = np.flatnonzero(test_y >= num_classes)
    if len(outside):
        bad = int(outside[0])
        raise DatasetError(
            "test sample {} in {} has cls {}, but no training sample does (training classes 0..{}): "
            "is a training shard missing or cut short?".format(
                *test_where[bad], int(test_y[bad]), num_classes - 1
            )
        )
    # Decoded together so both splits get the same channel layout and size check.
    where = train_where + test_where
    x = decode_images(
        train_blobs + test_blobs, lambda i: "sample {} in {}".format(*where[i]), cfg.resolution, cfg.transform
    )
    n = len(train_blobs)
    return finish(x[:n], train_y, x[n:], test_y, classes)


def fingerprint(cfg: DatasetConfig) -> str | None:
    """sha256 over (split/basename, bytes) of every local shard; None when a shard is remote."""
    h = settings_hash(cfg)
    train_urls, test_urls = shard_urls(cfg)
    if not all(_local_path(u) is not None for u in train_urls + test_urls):
        return None
    for split, urls in (("train", train_urls), ("test", test_urls)):
        for url in urls:
            path = _local_path(url)
            assert path is not None
            # The basename, not the full path: moving the dataset must not change its fingerprint.
            hash_file(h, f"{split}/{path.name}", path)
    listed = _class_list_url(cfg)
    if listed is not None and Path(listed).is_file():  # the names it gives are part of the data
        hash_file(h, CLASS_LIST, Path(listed))
    return h.hexdigest()


SOURCE = Source("webdataset", load, fingerprint)
