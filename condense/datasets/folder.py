"""An image folder: ``<root>/train/<class>/<image>`` and ``<root>/test|val/<class>/<image>``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    settings_hash,
)
from condense.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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


def load(cfg: DatasetConfig) -> RawDataset:
    layout = _folder_layout(dataset_root(cfg))
    train_y = np.asarray([label for _, label in layout.train], dtype=np.int64)
    keep = first_per_class(train_y, cfg.train_per_class)
    files = [layout.train[i][0] for i in keep] + [p for p, _ in layout.test]
    x = decode_images(files, lambda i: str(files[i]), cfg.resolution, cfg.transform)
    n = len(keep)
    test_y = np.asarray([label for _, label in layout.test], dtype=np.int64)
    return finish(x[:n], train_y[keep], x[n:], test_y, layout.classes)


def fingerprint(cfg: DatasetConfig) -> str:
    """sha256 over (relative path, bytes) of every image file, in reading order."""
    h = settings_hash(cfg)
    layout = _folder_layout(dataset_root(cfg))
    for path, _ in layout.train + layout.test:
        hash_file(h, path.relative_to(layout.root).as_posix(), path)
    return h.hexdigest()


SOURCE = Source("folder", load, fingerprint)
