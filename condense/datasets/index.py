"""An index of WebDataset shards: where every sample's image lies, and its label, without decoding.

Built once by reading tar headers (and the few bytes of each ``cls`` member), it lets a
class-balanced draw (a real batch per class, RDED's candidates, the random-real baseline) read
exactly the images it needs by byte range, and lets an epoch read shards sequentially in a shuffled
order. Shards are opened with fsspec, so local files, ``file://``, ``s3://``, ``gs://`` and
``https://`` all work; they must be uncompressed ``.tar`` (a gzip stream has no random access).

Per split the index is five arrays of equal length, in reading order (shards sorted, members in tar
order, as the in-memory path reads them): ``shard`` (position in the split's shard list),
``offset`` and ``size`` (the image member's data bytes), ``label``, and ``ext`` (index into
:data:`IMAGE_EXTS`).

A :class:`Reader` reads the images an index points at: :class:`TarReader` by byte range, or
``huggingface.RowReader`` by row of a memory-mapped Arrow split (whose index has shard = block of
rows, offset = row, size 0).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

import numpy as np
from PIL import Image

from condense.datasets.common import hash_array, open_image, relabel
from condense.errors import DatasetError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class SplitIndex:
    """The samples of one split: arrays in reading order, and the shard names they point into."""

    shards: list[str]
    """Shard basenames, in order; resolved to URLs when read (moving the data changes nothing)."""
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    skipped: list[str] = field(default_factory=list)
    """Samples left out under ``on_corrupt: skip``, with why (the first few kept verbatim)."""
    skipped_count: int = 0

    def __len__(self) -> int:
        return len(self.label)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_{name}": getattr(self, name) for name in ("shard", "offset", "size", "label")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, shards: list[str]) -> SplitIndex:
        return cls(shards, *(arrays[f"{prefix}_{name}"] for name in ("shard", "offset", "size", "label")))

    def relabelled(self, picks: list[int] | None) -> SplitIndex:
        """Only the samples of classes ``picks``, class ``picks[i]`` relabelled ``i`` (``dataset.classes``);
        itself when ``picks`` is None."""
        if picks is None:
            return self
        rows, labels = relabel(self.label, picks)
        kept = self.subset(rows)
        kept.label = labels
        return kept

    def subset(self, keep: np.ndarray) -> SplitIndex:
        return SplitIndex(
            self.shards,
            self.shard[keep],
            self.offset[keep],
            self.size[keep],
            self.label[keep],
            self.skipped,
            self.skipped_count,
        )


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's sample key and extension: the key ends at the first dot of the basename."""
    path = PurePosixPath(name)
    stem, dot, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower() if dot else ""


def open_shard(url: str) -> Any:
    """The shard at ``url`` as a seekable binary file (fsspec: local paths and any URL scheme)."""
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot open shard {url}: {err}") from None


def _samples(url: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """(key, {ext: member}, tar) of each sample of a shard, reading headers only."""
    if url.endswith((".gz", ".tgz")):
        raise DatasetError(
            f"shard {url} is gzip-compressed: streaming needs uncompressed .tar shards (a gzip stream "
            "cannot be read at random); recompress them or use dataset.load: memory"
        )
    try:
        with open_shard(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            key: str | None = None
            members: dict[str, tarfile.TarInfo] = {}
            end = 0
            for member in tar:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not member.isfile():
                    continue
                sample, ext = _split_name(member.name)
                if sample != key:
                    if key is not None:
                        yield key, members, tar
                    key, members = sample, {}
                members[ext] = member
                tar.members = []  # headers of past samples are not needed: keep memory flat
            check_complete(f, end, url)  # before the last sample: a cut shard yields nothing more
            if key is not None:
                yield key, members, tar
    except tarfile.TarError as err:
        raise DatasetError(f"corrupt or unreadable shard {url}: {err}") from None


END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
"""A tar ends with two zero blocks; a copy cut short at a block boundary has none."""


def check_complete(f: Any, end: int, url: str) -> None:
    """Raise unless the tar file ``f``, whose last member's (padded) data ends at byte ``end``, holds
    all of that data and its end-of-archive blocks after it. Python's tarfile reads a shard cut at a
    512-byte boundary (an interrupted copy) as a shorter, valid one: its missing samples would
    silently be a smaller dataset."""
    size = f.seek(0, 2)
    if end > size:
        raise DatasetError(
            f"shard {url} is truncated: its last member needs {end} bytes, the file has {size}; copy it again"
        )
    f.seek(end)
    if f.read(END_OF_ARCHIVE).strip(b"\0") or size - end < END_OF_ARCHIVE:
        raise DatasetError(
            f"shard {url} is truncated: it ends at byte {size} without the tar's end-of-archive blocks"
            " (an interrupted copy?); copy it again"
        )


def check_shard(url: str) -> None:
    """:func:`check_complete` for a whole shard file, reading its headers only."""
    try:
        with open_shard(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            end = 0
            for member in tar:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                tar.members = []
            check_complete(f, end, url)
    except tarfile.TarError as err:
        raise DatasetError(f"corrupt or unreadable shard {url}: {err}") from None


def index_split(urls: list[str], on_corrupt: str) -> SplitIndex:
    """Read every shard's headers and labels; a malformed sample is an error or skipped and counted."""
    shard, offset, size, label = [], [], [], []
    skipped: list[str] = []
    count = 0
    for position, url in enumerate(urls):
        for key, members, tar in _samples(url):
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            problem = None
            value = -1
            if image is None:
                problem = f"has no image ({'/'.join(IMAGE_EXTS)}; it has: {', '.join(members) or 'none'})"
            elif "cls" not in members:
                problem = "has no 'cls' key"
            else:
                raw = tar.extractfile(members["cls"]).read()  # type: ignore[union-attr]
                try:
                    value = int(raw.decode())
                except (UnicodeDecodeError, ValueError):
                    problem = f"has a non-integer 'cls': {raw!r:.40}"
                if value < 0 and problem is None:
                    problem = f"has a negative 'cls': {value}"
            if problem is not None:
                message = f"sample {key} in {url} {problem}"
                if on_corrupt == "error":
                    raise DatasetError(message + " (dataset.on_corrupt: skip leaves such samples out)")
                count += 1
                if len(skipped) < 10:
                    skipped.append(message)
                continue
            assert image is not None
            shard.append(position)
            offset.append(image.offset_data)
            size.append(image.size)
            label.append(value)
    names = [PurePosixPath(u.split("://", 1)[-1]).name for u in urls]
    if len(set(names)) != len(names):
        raise DatasetError("two shards of one split have the same file name; the index names shards by it")
    return SplitIndex(
        names,
        np.asarray(shard, dtype=np.int32),
        np.asarray(offset, dtype=np.int64),
        np.asarray(size, dtype=np.int64),
        np.asarray(label, dtype=np.int64),
        skipped,
        count,
    )


def resolve_shards(index: SplitIndex, urls: list[str], split: str) -> list[str]:
    """The URL of each indexed shard among ``urls`` (the data may have moved since indexing)."""
    by_name = {PurePosixPath(u.split("://", 1)[-1]).name: u for u in urls}
    missing = [name for name in index.shards if name not in by_name]
    if missing:
        raise DatasetError(
            f"the {split} index was built from shards that are not among the dataset's shards now "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); point dataset.path or "
            f"dataset.{split}_urls at them"
        )
    return [by_name[name] for name in index.shards]


def read_bytes(urls: list[str], index: SplitIndex, rows: np.ndarray) -> list[bytes]:
    """The encoded images of ``rows``, reading each shard once, in offset order, by byte range."""
    out: list[bytes] = [b""] * len(rows)
    order = np.lexsort((index.offset[rows], index.shard[rows]))
    current, handle = -1, None
    try:
        for position in order:
            row = rows[position]
            shard = int(index.shard[row])
            if shard != current:
                if handle is not None:
                    handle.close()
                handle, current = open_shard(urls[shard]), shard
            handle.seek(int(index.offset[row]))
            out[position] = handle.read(int(index.size[row]))
    finally:
        if handle is not None:
            handle.close()
    return out


class Reader(Protocol):
    """Reads the images of one split's index: as encoded values, opened to PIL when decoded."""

    @property
    def classes(self) -> list[str] | None:
        """The data's class names; None: classes are numbered by the labels."""
        ...

    def read(self, index: SplitIndex, rows: np.ndarray) -> list[Any]:
        """The encoded images of ``rows``, in that order."""
        ...

    def scan(self, index: SplitIndex, rows: range) -> Iterator[Any]:
        """The encoded images of one shard's ``rows``, read sequentially."""
        ...

    def where(self, index: SplitIndex, row: int) -> str:
        """``row`` as an error message names it."""
        ...

    def open(self, encoded: Any) -> Image.Image: ...


@dataclass(frozen=True)
class TarReader:
    """Images of WebDataset shards (``urls``, one per shard of the index), read by byte range."""

    urls: list[str]
    classes: None = None

    def read(self, index: SplitIndex, rows: np.ndarray) -> list[bytes]:
        return read_bytes(self.urls, index, rows)

    def scan(self, index: SplitIndex, rows: range) -> Iterator[bytes]:
        if not len(rows):
            return
        with open_shard(self.urls[int(index.shard[rows[0]])]) as f:
            for row in rows:
                f.seek(int(index.offset[row]))
                yield f.read(int(index.size[row]))

    def where(self, index: SplitIndex, row: int) -> str:
        return f"#{row} in {self.urls[int(index.shard[row])]}"

    def open(self, encoded: bytes) -> Image.Image:
        return open_image(encoded)


def encoded_bytes(urls: list[str]) -> int | None:
    """Total size of the shards in bytes; None when a store cannot tell (then ``auto`` keeps memory)."""
    import fsspec

    total = 0
    for url in urls:
        try:
            fs, path = fsspec.core.url_to_fs(url)
            total += int(fs.size(path))
        except (OSError, ValueError, TypeError):
            return None
    return total


def fingerprint(splits: Iterable[SplitIndex], classes: list[str] | None = None) -> str:
    """sha256 of indexes (shard names, byte layout, labels) and of the class names the data itself
    lists (a shard directory's ``classes.txt``), if any: stands for shards not hashed by content."""
    h = hashlib.sha256(b"condense.datasets.index\0")
    for split in splits:
        h.update(json.dumps(split.shards).encode() + b"\0")
        for array in (split.shard, split.offset, split.size, split.label):
            hash_array(h, array)
    if classes is not None:
        h.update(b"classes\0" + json.dumps(classes).encode())
    return h.hexdigest()


def check_labels(train: SplitIndex, test: SplitIndex, classes: list[str] | None = None) -> list[str]:
    """The classes (``classes``, or 0..C-1 with C from the training labels); the in-memory path's
    checks, by sample row."""
    if classes is None:
        num_classes = int(train.label.max()) + 1
        if num_classes > len(train):
            raise DatasetError(
                f"training sample #{int(np.argmax(train.label))} has cls {num_classes - 1}: classes must "
                f"be numbered 0..C-1, with C at most {len(train)} here"
            )
        classes = [str(i) for i in range(num_classes)]
    num_classes = len(classes)
    outside = np.flatnonzero((train.label < 0) | (train.label >= num_classes))
    if len(outside):
        raise DatasetError(
            f"training sample #{int(outside[0])} has label {int(train.label[outside[0]])}, outside the "
            f"{num_classes} classes 0..{num_classes - 1}"
        )
    counts = np.bincount(train.label, minlength=num_classes)
    if (counts == 0).any():
        raise DatasetError(f"class {classes[int(np.flatnonzero(counts == 0)[0])]} has no training images")
    outside = np.flatnonzero((test.label < 0) | (test.label >= num_classes))
    if len(outside):
        raise DatasetError(
            f"test sample #{int(outside[0])} (shard {test.shards[int(test.shard[outside[0]])]}) has cls "
            f"{int(test.label[outside[0]])}, but no training sample does (training classes 0.."
            f"{num_classes - 1}): is a training shard missing or cut short?"
        )
    tested = np.bincount(test.label, minlength=num_classes)
    if (tested == 0).any():
        missing = int(np.flatnonzero(tested == 0)[0])
        raise DatasetError(
            f"class {classes[missing]} has no test images: test accuracy would leave it out; add some"
        )
    return list(classes)


def native_side(reader: Reader, train: SplitIndex) -> int:
    """The side of the first training image, which must be square (else set dataset.resolution)."""
    (encoded,) = reader.read(train, np.zeros(1, dtype=np.int64))
    with reader.open(encoded) as im:
        width, height = im.size
    if width != height:
        raise DatasetError(f"images are {width}x{height}; set dataset.resolution to make them square")
    return width
