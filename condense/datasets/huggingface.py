"""Hugging Face ``datasets``: a local ``save_to_disk`` folder (``dataset.path``) or a hub dataset id
(``dataset.hf_name``), with an ``Image`` column and a ``ClassLabel`` column.

The splits are ``train`` and the first of ``test``/``validation``/``valid``/``val``. Class names are
the ``ClassLabel`` feature's names. The ``datasets`` package is an optional extra (``condense[hf]``):
it is imported only here, inside the functions that need it.

Besides :data:`SOURCE` (decode everything into arrays), :func:`hf_split`, :func:`labels` and
:func:`read_images` give random access to a split without decoding it whole; :func:`index_splits` and
:class:`RowReader` stream it (``dataset.load: stream``): memory-mapped Arrow is read by row, epochs
go through blocks of :data:`ROW_BLOCK` rows as a tar stream goes through its shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from condense.datasets.index import SplitIndex
from condense.errors import DatasetError

if TYPE_CHECKING:
    import datasets
    from PIL import Image

MISSING = "dataset.source huggingface needs the 'datasets' package: pip install 'condense[hf]'"
TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("test", "validation", "valid", "val")
IMAGE, LABEL = "image", "label"
"""The column names :func:`hf_split` gives the chosen image and label columns."""
_BATCH = 256
_HASHED = (".arrow", ".json")
_SKIPPED = frozenset({"state.json"})  # datasets' own bookkeeping (a fingerprint of its history)
ROW_BLOCK = 256
"""Streamed epochs read a split in blocks of this many consecutive rows (its "shards"), in a seeded
block order and then through the shuffle buffer."""
LOCATION = ("path", "hf_name", "hf_image_column", "hf_label_column")
"""The settings that say where a split's images are: a streamed dataset records them."""


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError(MISSING) from None
    return datasets


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _where(cfg: DatasetConfig) -> str:
    return f"hub dataset {cfg.hf_name!r}" if cfg.hf_name else f"{cfg.path}"


def _local_root(cfg: DatasetConfig) -> Path:
    return dataset_root(cfg, "dataset.path (a save_to_disk folder) or dataset.hf_name (a hub id)")


def _open(cfg: DatasetConfig) -> datasets.DatasetDict:
    """Every split, memory-mapped: ``load_dataset(hf_name)`` (downloaded into ``path`` when set) or
    ``load_from_disk(path)``. Nothing is decoded."""
    hf = _datasets()
    try:
        if cfg.hf_name:
            cache = str(Path(cfg.path).expanduser()) if cfg.path else None
            found = hf.load_dataset(cfg.hf_name, cache_dir=cache)
        else:
            found = hf.load_from_disk(str(_local_root(cfg)))
    except DatasetError:
        raise
    except Exception as err:  # hub, network, arrow or JSON errors: one line naming the dataset
        raise DatasetError(f"cannot open {_where(cfg)}: {_one_line(err)}") from None
    if not isinstance(found, hf.DatasetDict):
        raise DatasetError(
            f"{_where(cfg)} is a single split; save a DatasetDict with train and test splits"
            " (DatasetDict({'train': ..., 'test': ...}).save_to_disk(path))"
        )
    return found


def _pick_split(found: datasets.DatasetDict, split: str, cfg: DatasetConfig) -> datasets.Dataset:
    names = TRAIN_SPLITS if split == "train" else TEST_SPLITS
    for name in names:
        if name in found:
            return found[name]
    raise DatasetError(
        f"{_where(cfg)} has no {split} split ({'/'.join(names)}); its splits are {', '.join(found) or 'none'}"
    )


def _describe(features: Any) -> str:
    return ", ".join(f"{name} ({type(f).__name__})" for name, f in features.items())


def _column(ds: datasets.Dataset, kind: type, wanted: str | None, default: str, setting: str) -> str:
    """The column of feature type ``kind``: the one named by the setting, else the only one, else
    the one called ``default``; an error listing the columns otherwise."""
    features = ds.features
    if wanted is not None:
        if wanted not in features:
            raise DatasetError(
                f"dataset.{setting} {wanted!r} is not a column; columns: {_describe(features)}"
            )
        if not isinstance(features[wanted], kind):
            raise DatasetError(
                f"dataset.{setting} {wanted!r} is a {type(features[wanted]).__name__}, not a "
                f"{kind.__name__} feature; columns: {_describe(features)}"
            )
        return wanted
    found = [name for name, f in features.items() if isinstance(f, kind)]
    if len(found) == 1:
        return found[0]
    if default in found:
        return default
    what = f"no {kind.__name__} column" if not found else f"{len(found)} {kind.__name__} columns"
    hint = " (class names come from one: cast an int column to ClassLabel(names=[...]))"
    raise DatasetError(
        f"{what}{hint if kind.__name__ == 'ClassLabel' and not found else ''}; set dataset.{setting}; "
        f"columns: {_describe(features)}"
    )


def _canonical(ds: datasets.Dataset, cfg: DatasetConfig) -> datasets.Dataset:
    """Only the image and label columns, named :data:`IMAGE` and :data:`LABEL`, images decoded to PIL
    when read (no data is copied)."""
    hf = _datasets()
    image = _column(ds, hf.Image, cfg.hf_image_column, IMAGE, "hf_image_column")
    label = _column(ds, hf.ClassLabel, cfg.hf_label_column, LABEL, "hf_label_column")
    ds = ds.select_columns([image, label])
    if (image, label) != (IMAGE, LABEL):
        ds = ds.rename_columns({image: IMAGE, label: LABEL})  # all at once: swapped names are fine
    if not ds.features[IMAGE].decode:
        ds = ds.cast_column(IMAGE, hf.Image())
    return ds


def hf_split(cfg: DatasetConfig, split: str) -> datasets.Dataset:
    """The ``train`` or ``test`` split (``test`` is the first of test/validation/valid/val), opened
    once and memory-mapped, nothing decoded; with exactly two columns, :data:`IMAGE` (a PIL image when
    read) and :data:`LABEL` (a ``ClassLabel``: ``class_names(ds)``). ``train_per_class`` is not applied
    (``first_per_class(labels(ds), n)`` gives those rows)."""
    if split not in ("train", "test"):
        raise ValueError(f"split is 'train' or 'test', not {split!r}")
    return _canonical(_pick_split(_open(cfg), split, cfg), cfg)


def class_names(ds: datasets.Dataset) -> list[str]:
    """The class names of a :func:`hf_split` split: its ``ClassLabel`` names, index = label."""
    return [str(n) for n in ds.features[LABEL].names]


def labels(ds: datasets.Dataset) -> np.ndarray:
    """int64 labels of every row of a :func:`hf_split` split, read from the label column alone (no
    image is read or decoded)."""
    column = ds.with_format("arrow", columns=[LABEL])[:].column(LABEL)
    if column.null_count:
        raise DatasetError(f"{column.null_count} of {len(column)} rows have no label")
    return np.asarray(column.to_numpy(), dtype=np.int64)


def read_encoded(ds: datasets.Dataset, indices: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
    """The stored image values (``{"bytes", "path"}``) of rows ``indices`` of a :func:`hf_split`
    split, in that order, not decoded."""
    rows = [int(i) for i in indices]
    if not rows:
        return []
    return ds.with_format("arrow", columns=[IMAGE])[rows].column(IMAGE).to_pylist()


def open_encoded(ds: datasets.Dataset, value: dict[str, Any]) -> Image.Image:
    """One :func:`read_encoded` value as PIL, decoded as reading the row decodes it (the ``Image``
    feature's ``decode_example``: EXIF orientation, the feature's mode)."""
    return ds.features[IMAGE].decode_example(value)


def read_images(ds: datasets.Dataset, indices: Sequence[int] | np.ndarray) -> list[Image.Image]:
    """The images of rows ``indices`` of a :func:`hf_split` split, decoded to PIL, in that order."""
    return [open_encoded(ds, value) for value in read_encoded(ds, indices)]


class _LazyImages(Sequence):
    """The images of some rows, read and decoded a batch at a time as :func:`decode_images` iterates
    (so only the decoded uint8 array is ever whole in memory)."""

    def __init__(self, ds: datasets.Dataset, rows: np.ndarray) -> None:
        self.ds, self.rows = ds, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return read_images(self.ds, self.rows[i])
        return read_images(self.ds, [self.rows[i]])[0]

    def __iter__(self) -> Iterator[Image.Image]:
        for start in range(0, len(self.rows), _BATCH):
            yield from read_images(self.ds, self.rows[start : start + _BATCH])


def _decode(ds: datasets.Dataset, rows: np.ndarray, split: str, cfg: DatasetConfig) -> np.ndarray:
    return decode_images(
        _LazyImages(ds, rows), lambda i: f"{split} row {int(rows[i])}", cfg.resolution, cfg.transform
    )


def _splits(cfg: DatasetConfig) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """The train and test splits (:func:`hf_split`) and their class names, which must agree."""
    found = _open(cfg)
    train = _canonical(_pick_split(found, "train", cfg), cfg)
    test = _canonical(_pick_split(found, "test", cfg), cfg)
    classes = class_names(train)
    if class_names(test) != classes:
        raise DatasetError(
            f"{_where(cfg)}: the test split's class names differ from the train split's "
            f"({class_names(test)[:5]}... vs {classes[:5]}...)"
        )
    return train, test, classes


def kept_classes(cfg: DatasetConfig, classes: list[str]) -> list[str]:
    """The class names after ``dataset.classes`` (index = label)."""
    picks = select_classes(classes, cfg.classes, _where(cfg))
    return classes if picks is None else [classes[i] for i in picks]


def load(cfg: DatasetConfig) -> RawDataset:
    train, test, classes = _splits(cfg)
    picks = select_classes(classes, cfg.classes, _where(cfg))
    train_rows, train_y = relabel(labels(train), picks)
    test_rows, test_y = relabel(labels(test), picks)
    keep = first_per_class(train_y, cfg.train_per_class)
    train_x = _decode(train, train_rows[keep], "train", cfg)
    test_x = _decode(test, test_rows, "test", cfg)
    return finish(train_x, train_y[keep], test_x, test_y, kept_classes(cfg, classes))


def fingerprint(cfg: DatasetConfig) -> str | None:
    """A local folder: sha256 over (relative path, bytes) of its files (the arrow data, the features
    and split lists; not datasets' ``state.json``), so a copy elsewhere has the same key. A hub
    dataset: None (the decoded arrays are hashed)."""
    if cfg.hf_name:
        return None
    root = _local_root(cfg)
    h = settings_hash(cfg)
    h.update(json.dumps([cfg.hf_image_column, cfg.hf_label_column, cfg.transform]).encode() + b"\0")
    files = sorted(
        p for p in root.rglob("*") if p.suffix in _HASHED and p.name not in _SKIPPED and p.is_file()
    )
    if not any(p.suffix == ".arrow" for p in files):
        raise DatasetError(f"{root} holds no .arrow files: not a folder written by save_to_disk")
    for path in files:
        hash_file(h, path.relative_to(root).as_posix(), path)
    return h.hexdigest()


def encoded_bytes(cfg: DatasetConfig) -> int | None:
    """Size of the training split's arrow files (``dataset.load: auto`` streams above
    ``stream_above_mb``); None when it has none (a dataset held in memory)."""
    files = [Path(f["filename"]) for f in _pick_split(_open(cfg), "train", cfg).cache_files]
    return sum(p.stat().st_size for p in files) if files else None


def index_splits(cfg: DatasetConfig) -> dict[str, SplitIndex]:
    """Both splits for streaming, without reading an image: shard = block of :data:`ROW_BLOCK` rows,
    offset = row, size 0, and the labels. ``train_per_class`` is not applied (the stage subsets)."""
    out = {}
    train, test, classes = _splits(cfg)
    picks = select_classes(classes, cfg.classes, _where(cfg))
    for split, ds in (("train", train), ("test", test)):
        y = labels(ds)
        if not len(y):
            raise DatasetError(f"{_where(cfg)}: the {split} split has no rows")
        rows = np.arange(len(y), dtype=np.int64)
        blocks = [f"{split}[{lo}:{min(lo + ROW_BLOCK, len(y))}]" for lo in range(0, len(y), ROW_BLOCK)]
        found = SplitIndex(blocks, (rows // ROW_BLOCK).astype(np.int32), rows, np.zeros_like(rows), y)
        out[split] = found.relabelled(picks)
    return out


class RowReader:
    """A split's images read by row (a :class:`condense.datasets.index.Reader`): a value is the stored
    image (:func:`read_encoded`), decoded by :meth:`open`. The split is opened once per process, on
    first use: each DataLoader worker opens its own memory map."""

    def __init__(self, cfg: DatasetConfig, split: str) -> None:
        self.cfg, self.split = cfg, split
        self._opened: tuple[int, datasets.Dataset] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}

    @property
    def dataset(self) -> datasets.Dataset:
        if self._opened is None or self._opened[0] != os.getpid():
            self._opened = (os.getpid(), hf_split(self.cfg, self.split))
        return self._opened[1]

    @property
    def classes(self) -> list[str]:
        return class_names(self.dataset)

    def read(self, index: SplitIndex, rows: np.ndarray) -> list[dict[str, Any]]:
        return read_encoded(self.dataset, index.offset[rows])

    def scan(self, index: SplitIndex, rows: range) -> Iterator[dict[str, Any]]:
        return iter(read_encoded(self.dataset, index.offset[rows.start : rows.stop]))

    def where(self, index: SplitIndex, row: int) -> str:
        return f"{self.split} row {int(index.offset[row])}"

    def open(self, value: dict[str, Any]) -> Image.Image:
        return open_encoded(self.dataset, value)


SOURCE = Source("huggingface", load, fingerprint)
