"""scikit-learn's handwritten digits: 8x8 grayscale, 10 classes, shipped with scikit-learn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from condense.config import DatasetConfig
from condense.datasets.common import (
    RawDataset,
    Source,
    finish,
    first_per_class,
    hash_array,
    resize_array,
    settings_hash,
    subset_raw,
)


def load(cfg: DatasetConfig) -> RawDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    # Sorted: "file order" is sklearn's order, whatever order the split happened to return.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_idx = train_idx[first_per_class(y[train_idx], cfg.train_per_class)]
    raw = finish(
        resize_array(x[train_idx], cfg.resolution),
        y[train_idx],
        resize_array(x[test_idx], cfg.resolution),
        y[test_idx],
        [str(i) for i in range(10)],
    )
    return subset_raw(raw, cfg, "digits")


def _data_file() -> Path | None:
    """scikit-learn's digits file, found without importing scikit-learn (over a second)."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def fingerprint(cfg: DatasetConfig) -> str:
    """A hash of scikit-learn's digits file (else of its decoded arrays), and of the settings that
    change the decoded data."""
    h = settings_hash(cfg)
    path = _data_file()
    if path is not None:
        h.update(path.read_bytes())
        return h.hexdigest()
    from sklearn.datasets import load_digits

    digits = load_digits()
    hash_array(h, digits.images)
    hash_array(h, digits.target)
    return h.hexdigest()


SOURCE = Source("digits", load, fingerprint)
