"""A ``torchvision.datasets`` class by name (``dataset.name: CIFAR10``), downloaded to ``dataset.path``."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from condense.config import DatasetConfig
from condense.datasets.common import (
    RawDataset,
    Source,
    decode_images,
    finish,
    first_per_class,
    resize_array,
    subset_raw,
)
from condense.errors import DatasetError

TORCHVISION_ROOT = "data/torchvision"


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
        keep = first_per_class(y, limit)
        return resize_array(x[keep], resolution), y[keep]
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
    keep = first_per_class(y, limit)
    return decode_images([images[i] for i in keep], lambda i: f"#{keep[i]}", resolution), y[keep]


def load(cfg: DatasetConfig) -> RawDataset:
    return load_raw(cfg, download=True)


def load_raw(cfg: DatasetConfig, download: bool = True, hint: str = "") -> RawDataset:
    """Both splits decoded; ``download``: let torchvision download what is not in the root yet
    (``hint`` ends the message when the dataset cannot be built)."""
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
            dataset = dataset_cls(root=root, train=train, download=download)
        except Exception as err:  # download, extraction or constructor errors, all shown as one line
            raise DatasetError(
                f"cannot load torchvision.datasets.{cfg.name}(root={root!r}, train={train}): "
                f"{_one_line(err)}{hint}"
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
    raw = finish(train_x, train_y, test_x, test_y, classes)
    return subset_raw(raw, cfg, f"torchvision.datasets.{cfg.name}")


def fingerprint(cfg: DatasetConfig) -> None:
    """Only decoding tells (the files are the library's own format)."""
    return None


SOURCE = Source("torchvision", load, fingerprint)
