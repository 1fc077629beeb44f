"""``condense data convert``: any supported source written as uncompressed WebDataset shards.

The output is what ``source: webdataset`` reads and streams: ``train-NNNNNN.tar`` and
``test-NNNNNN.tar``, each sample a ``<key>.<ext>`` image and a ``<key>.cls`` label, plus
:data:`~condense.datasets.shards.CLASS_LIST` (the class names, one per line in ``cls`` order). An
image is written as the source stores it where it has encoded bytes (an image file, a shard member,
a Hugging Face ``Image`` value in a format shards carry), else as PNG (torchvision and digits arrays,
other formats): no pixel changes on the way. The training split is shuffled with a fixed seed
unless ``keep_order`` (a streamed epoch shuffles shard order and a buffer of a few thousand samples:
class-sorted shards would give single-class batches); the test split keeps the source's order.

The sources are read through their own modules (:mod:`~condense.datasets.folder`,
:mod:`~condense.datasets.shards`, :mod:`~condense.datasets.huggingface`,
:mod:`~condense.datasets.torchvision`), with ``dataset.classes`` applied as a run applies it. The
folder is written beside ``out_dir`` and renamed into place whole.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from condense.config import DatasetConfig
from condense.datasets.common import RawDataset, dataset_root, relabel, select_classes
from condense.datasets.index import IMAGE_EXTS
from condense.datasets.shards import CLASS_LIST
from condense.errors import CondenseError, ConfigError, DatasetError
from condense.folders import replace_folder, target_folder
from condense.progress import Progress

SHARD_SIZE = 10_000
"""Samples per shard by default."""
_BATCH = 256
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
"""PIL formats that shards carry as they are (the keys every reader of shards knows)."""


@dataclass
class _Split:
    """One split to write: labels (after ``classes``), and how to read the encoded images of rows."""

    labels: np.ndarray
    read: Callable[[np.ndarray], list[tuple[bytes, str]]]
    """(encoded image, extension) of the given rows, in that order."""


@dataclass
class Converted:
    """What :func:`convert` wrote."""

    out_dir: Path
    classes: list[str]
    counts: dict[str, int]
    shards: dict[str, int]


def source_config(src: str, root: str | None = None, classes: list[str] | None = None) -> DatasetConfig:
    """The dataset settings that read ``src``: ``torchvision:NAME`` (``root``: download root),
    ``hf:ID`` (a hub dataset; ``root``: its cache), ``digits``, or a folder: a Hugging Face
    ``save_to_disk`` folder, WebDataset shards (``train-*.tar[.gz]``) or an image folder
    (``train/<class>/...``, Tiny-ImageNet's layout included)."""
    from pydantic import ValidationError

    try:
        return _source_config(src, root, classes)
    except ValidationError as err:  # one line: what pydantic found wrong
        raise ConfigError(f"SRC {src}: " + "; ".join(e["msg"] for e in err.errors())) from None


def _source_config(src: str, root: str | None, classes: list[str] | None) -> DatasetConfig:
    extra: dict[str, Any] = {"classes": classes} if classes is not None else {}
    if src.startswith("torchvision:"):
        name = src.split(":", 1)[1]
        if not name:
            raise ConfigError(
                "torchvision:NAME needs a torchvision.datasets class, e.g. torchvision:CIFAR100"
            )
        return DatasetConfig(source="torchvision", name=name, path=root, **extra)
    if src.startswith("hf:"):
        hub_id = src.split(":", 1)[1]
        if not hub_id:
            raise ConfigError("hf:ID needs a hub dataset id, e.g. hf:uoft-cs/cifar100")
        return DatasetConfig(source="huggingface", name="converted", hf_name=hub_id, path=root, **extra)
    if src == "digits":
        return DatasetConfig(source="digits", **extra)
    path = Path(src).expanduser()
    if not path.exists():
        raise ConfigError(
            f"SRC {src} not found: a folder (image folder, shards, save_to_disk folder), "
            "torchvision:NAME, hf:ID or digits"
        )
    if not path.is_dir():
        raise ConfigError(f"SRC {src} is a file, not a folder (image folder, shards or save_to_disk folder)")
    if (path / "dataset_dict.json").is_file():
        kind = "huggingface"
    elif any(path.glob("train-*.tar")) or any(path.glob("train-*.tar.gz")) or any(path.glob("train-*.tgz")):
        kind = "webdataset"
    elif (path / "train").is_dir():
        kind = "folder"
    else:
        raise ConfigError(
            f"SRC {src} is neither an image folder (train/<class>/<image>), WebDataset shards "
            "(train-*.tar) nor a Hugging Face save_to_disk folder (dataset_dict.json)"
        )
    return DatasetConfig(source=kind, name="converted", path=str(path), **extra)


def _sniffed(data: bytes, where: str) -> tuple[bytes, str]:
    """``data`` with the shard extension of its format, or re-encoded as PNG when shards do not
    carry its format (GIF, TIFF, ...); the header alone is read for the check."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = _FORMATS.get(im.format or "")
            if ext is not None:
                return data, ext
            return _png(im), "png"
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot read image {where}: {err}") from None


def _png(im: Image.Image) -> bytes:
    if im.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "P"):
        im = im.convert("RGB")
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


def _array_png(pixels: np.ndarray) -> bytes:
    """A ``(C, H, W)`` uint8 image as PNG, exactly (gray for one channel)."""
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    return _png(image)


def _folder(cfg: DatasetConfig) -> tuple[list[str], dict[str, _Split]]:
    from condense.datasets.folder import folder_layout

    layout = folder_layout(dataset_root(cfg), cfg.classes)

    def split(files: list[tuple[Path, int]]) -> _Split:
        def read(rows: np.ndarray) -> list[tuple[bytes, str]]:
            out = []
            for row in rows:
                path = files[int(row)][0]
                try:
                    data = path.read_bytes()
                except OSError as err:
                    raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
                out.append(_sniffed(data, str(path)))
            return out

        return _Split(np.asarray([label for _, label in files], dtype=np.int64), read)

    return layout.classes, {"train": split(layout.train), "test": split(layout.test)}


def _shards(cfg: DatasetConfig) -> tuple[list[str], dict[str, _Split]]:
    from condense.datasets import index, shards

    names, picks, _ = shards.shard_classes(cfg)
    splits: dict[str, _Split] = {}
    for split, urls in zip(("train", "test"), shards.shard_urls(cfg), strict=True):
        if all(not u.endswith((".gz", ".tgz")) for u in urls):
            # Uncompressed: an index of headers, images read by byte range as they are written.
            found = index.index_split(urls, "error")
            reader = index.TarReader(urls)
            rows, labels = relabel(found.label, picks)
            kept = found.subset(rows)

            def read(chosen: np.ndarray, kept: index.SplitIndex = kept, reader: Any = reader) -> list[Any]:
                blobs = reader.read(kept, chosen)
                return [_sniffed(b, reader.where(kept, int(r))) for b, r in zip(blobs, chosen, strict=True)]

            splits[split] = _Split(labels, read)
        else:  # gzip streams have no random access: read whole, into memory
            blobs, all_labels, where = shards._read_split(urls)
            rows, labels = relabel(all_labels, picks)
            blobs = [blobs[i] for i in rows]
            where = [where[i] for i in rows]

            def read_memory(chosen: np.ndarray, blobs: list[bytes] = blobs, where: Any = where) -> list[Any]:
                return [_sniffed(blobs[int(r)], "sample {} in {}".format(*where[int(r)])) for r in chosen]

            splits[split] = _Split(labels, read_memory)
    top = max((int(s.labels.max(initial=-1)) for s in splits.values()), default=-1)
    if names is None:
        classes = [str(i) for i in range(top + 1)]
    else:
        classes = names if picks is None else [names[i] for i in picks]
        if top >= len(classes):
            raise DatasetError(
                f"the shards have cls {top}, but their class list names {len(classes)} classes"
            )
    return classes, splits


def _huggingface(cfg: DatasetConfig) -> tuple[list[str], dict[str, _Split]]:
    from condense.datasets import huggingface

    train, test, names = huggingface._splits(cfg)
    picks = select_classes(names, cfg.classes, huggingface._where(cfg))
    splits: dict[str, _Split] = {}
    for split, ds in (("train", train), ("test", test)):
        rows, labels = relabel(huggingface.labels(ds), picks)

        def read(chosen: np.ndarray, ds: Any = ds, rows: np.ndarray = rows, split: str = split) -> list[Any]:
            out = []
            for row, value in zip(rows[chosen], huggingface.read_encoded(ds, rows[chosen]), strict=True):
                where = f"{split} row {int(row)}"
                data = value.get("bytes") if isinstance(value, dict) else None
                if data is None and isinstance(value, dict) and value.get("path"):
                    try:
                        data = Path(value["path"]).read_bytes()
                    except OSError:
                        data = None
                if data is not None:
                    out.append(_sniffed(data, where))
                else:  # no stored bytes to pass on: decode as a run does, write PNG
                    out.append((_png(huggingface.open_encoded(ds, value)), "png"))
            return out

        splits[split] = _Split(labels, read)
    return huggingface.kept_classes(cfg, names), splits


def _arrays(raw: RawDataset) -> tuple[list[str], dict[str, _Split]]:
    def split(x: np.ndarray, y: np.ndarray) -> _Split:
        return _Split(y, lambda rows: [(_array_png(x[int(r)]), "png") for r in rows])

    return list(raw.classes), {
        "train": split(raw.train_x, raw.train_y),
        "test": split(raw.test_x, raw.test_y),
    }


def _read(cfg: DatasetConfig, download: bool) -> tuple[list[str], dict[str, _Split]]:
    if cfg.source == "folder":
        return _folder(cfg)
    if cfg.source == "webdataset":
        return _shards(cfg)
    if cfg.source == "huggingface":
        return _huggingface(cfg)
    if cfg.source == "torchvision":
        from condense.datasets import torchvision

        hint = "" if download else " (pass --download to let torchvision download it)"
        return _arrays(torchvision.load_raw(cfg, download=download, hint=hint))
    from condense.datasets import load_source

    return _arrays(load_source(cfg))


def _check_names(classes: Sequence[str]) -> None:
    for name in classes:
        if not name.strip() or "\n" in name or "\r" in name:
            raise DatasetError(f"class name {name!r} cannot be a line of the class list")
    if len(set(classes)) != len(classes):
        twice = next(n for n in classes if list(classes).count(n) > 1)
        raise DatasetError(f"two classes are named {twice!r}; the class list needs distinct names")


class _ShardSink:
    """Uncompressed tar shards ``<prefix>-NNNNNN.tar``: a new one after ``max_count`` samples or once
    one holds ``max_bytes``. Members have fixed metadata (mtime 0), so a rerun writes the same bytes."""

    def __init__(self, folder: Path, prefix: str, max_count: int, max_bytes: int | None) -> None:
        self.folder, self.prefix = folder, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.tar: tarfile.TarFile | None = None
        self.count = self.size = self.shards = 0

    def _add(self, name: str, data: bytes) -> None:
        assert self.tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self.tar.addfile(info, io.BytesIO(data))
        self.size += tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def write(self, key: str, image: bytes, ext: str, label: int) -> None:
        full = self.count >= self.max_count or (self.max_bytes is not None and self.size >= self.max_bytes)
        if self.tar is None or full:
            self.close()
            self.tar = tarfile.open(  # noqa: SIM115 - closed by close(), shard after shard
                self.folder / f"{self.prefix}-{self.shards:06d}.tar", "w", format=tarfile.USTAR_FORMAT
            )
            self.shards += 1
            self.count = self.size = 0
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.cls", str(label).encode())
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def convert(
    cfg: DatasetConfig,
    out_dir: str | Path,
    shard_size: int = SHARD_SIZE,
    shard_mb: float | None = None,
    keep_order: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    download: bool = False,
    progress: Progress | None = None,
) -> Converted:
    """Write the data ``cfg`` reads (:func:`source_config`) as WebDataset shards in ``out_dir``:
    ``shard_size`` samples a shard at most (and ``shard_mb`` MB, when given), the class list beside
    them. A non-empty ``out_dir`` is refused unless ``overwrite`` (then replaced whole, once done)."""
    if shard_size <= 0:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    if shard_mb is not None and shard_mb <= 0:
        raise ConfigError(f"--shard-mb must be positive, got {shard_mb}")
    out_dir = target_folder(out_dir, overwrite)
    if cfg.path and cfg.source != "torchvision" and not cfg.hf_name:
        source = Path(cfg.path).expanduser().absolute()
        if source == out_dir or out_dir in source.parents or source in out_dir.parents:
            raise ConfigError(f"--to {out_dir} and the source {source} overlap; write the shards elsewhere")
    classes, splits = _read(cfg, download)
    _check_names(classes)
    for split, found in splits.items():
        if not len(found.labels):
            raise DatasetError(f"the source's {split} split has no samples (of the classes asked for)")
    max_bytes = int(shard_mb * 2**20) if shard_mb is not None else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    counts, written = {}, {}
    try:
        for split, found in splits.items():
            total = len(found.labels)
            order = np.arange(total)
            if split == "train" and not keep_order:
                order = np.random.default_rng(seed).permutation(total)
            bar = progress or Progress(f"convert {split}")
            sink = _ShardSink(staging, split, shard_size, max_bytes)
            try:
                for start in range(0, total, _BATCH):
                    chosen = order[start : start + _BATCH]
                    for i, ((image, ext), row) in enumerate(zip(found.read(chosen), chosen, strict=True)):
                        assert ext in IMAGE_EXTS
                        sink.write(f"{start + i:08d}", image, ext, int(found.labels[row]))
                    bar.step(min(start + _BATCH, total), total, f"{split} images")
            finally:
                sink.close()
            counts[split], written[split] = total, sink.shards
        (staging / CLASS_LIST).write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
        replace_folder(staging, out_dir)
    except CondenseError:
        raise
    except OSError as err:
        raise CondenseError(
            f"cannot write the shards under {out_dir.parent}: {err.strerror or err}"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Converted(out_dir, list(classes), counts, written)
