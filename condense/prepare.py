"""The dataset stage: decode a source once, keep it in the store with its card, load it as tensors.

The card records what every later stage needs to know about the data: fingerprint, classes and
their counts, shape, and the per-channel mean/std of the training split used to normalise inputs.
With ``zca: true`` inputs are ZCA-whitened instead (MTT's convention: no mean/std step before ZCA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from condense import datasets, zca
from condense.config import DatasetConfig
from condense.errors import DatasetError
from condense.store import Store, code_version, load_arrays, save_arrays, stage_key

STAGE = "dataset"


@dataclass
class PreparedDataset:
    """Network-ready tensors (normalised or whitened) and the card describing them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    card: dict[str, Any]
    whitening: zca.ZCA | None = None

    @property
    def num_classes(self) -> int:
        return len(self.card["classes"])

    @property
    def channels(self) -> int:
        return self.card["channels"]

    @property
    def resolution(self) -> int:
        return self.card["resolution"]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Back from network inputs to viewable [0, 1] pixels (inverse whitening/normalisation)."""
        if self.whitening is not None:
            x = zca.invert_zca(x, self.whitening)
        else:
            mean = torch.tensor(self.card["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(self.card["std"]).view(1, -1, 1, 1)
            x = x * std + mean
        return x.clamp(0, 1)


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    pixels = x.astype(np.float64) / 255.0
    return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()


def _card(cfg: DatasetConfig, raw: datasets.RawDataset, fingerprint: str) -> dict[str, Any]:
    height, width = raw.train_x.shape[2:]
    if height != width:
        raise DatasetError(f"images are {height}x{width}; set dataset.resolution to make them square")
    counts = np.bincount(raw.train_y, minlength=len(raw.classes))
    mean, std = _channel_stats(raw.train_x)
    return {
        "name": cfg.name,
        "source": cfg.source,
        "fingerprint": fingerprint,
        "classes": list(raw.classes),
        "class_counts": counts.tolist(),
        "channels": int(raw.train_x.shape[1]),
        "resolution": int(raw.train_x.shape[2]),
        "train_count": int(len(raw.train_y)),
        "test_count": int(len(raw.test_y)),
        "mean": mean,
        "std": [max(s, 1e-6) for s in std],
        "zca": cfg.zca,
    }


def dataset_key(cfg: DatasetConfig, fingerprint: str) -> str:
    config = cfg.model_dump(exclude={"path", "train_urls", "test_urls"})  # the content, not its address
    return stage_key(STAGE, config, code_version(datasets, zca), {"source": fingerprint})


def check_ipc(card: dict[str, Any], ipc: int) -> None:
    smallest = min(card["class_counts"])
    if ipc > smallest:
        cls = card["classes"][card["class_counts"].index(smallest)]
        raise DatasetError(
            f"ipc={ipc} is larger than the smallest class ({cls!r} has {smallest} training images)"
        )


def prepare(cfg: DatasetConfig, store: Store, ipc: int) -> tuple[str, bool]:
    """Make sure the dataset is in the store; returns (key, was_cached).

    ``ipc`` is checked against the class counts before anything is written, so a bad request leaves
    the store as it was.
    """
    fingerprint = datasets.source_fingerprint(cfg)
    if fingerprint is not None:
        key = dataset_key(cfg, fingerprint)
        if store.has(STAGE, key):
            check_ipc(store.meta(STAGE, key)["card"], ipc)
            return key, True
    raw = datasets.load_source(cfg)
    fingerprint = fingerprint or datasets.content_fingerprint(raw)
    key = dataset_key(cfg, fingerprint)
    card = _card(cfg, raw, fingerprint)
    check_ipc(card, ipc)
    if store.has(STAGE, key):
        return key, True
    with store.writing(STAGE, key) as tmp:
        save_arrays(
            tmp / "data.zarr",
            {"train_x": raw.train_x, "train_y": raw.train_y, "test_x": raw.test_x, "test_y": raw.test_y},
        )
        if cfg.zca:
            whitening = zca.fit_zca(torch.from_numpy(raw.train_x).float() / 255.0)
            save_arrays(
                tmp / "zca.zarr",
                {k: getattr(whitening, k).numpy() for k in ("mean", "transform", "inverse")},
            )
        store.commit(STAGE, key, tmp, {"card": card})
    return key, False


def _to_inputs(x: np.ndarray, card: dict[str, Any], whitening: zca.ZCA | None) -> torch.Tensor:
    pixels = torch.from_numpy(x).float() / 255.0
    if whitening is not None:
        return zca.apply_zca(pixels, whitening)
    mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


def load(store: Store, key: str) -> PreparedDataset:
    """The stored dataset as network inputs."""
    card = store.meta(STAGE, key)["card"]
    arrays = load_arrays(store.path(STAGE, key) / "data.zarr")
    whitening = None
    if card["zca"]:
        z = load_arrays(store.path(STAGE, key) / "zca.zarr")
        whitening = zca.ZCA(**{k: torch.from_numpy(v) for k, v in z.items()})
    return PreparedDataset(
        train_x=_to_inputs(arrays["train_x"], card, whitening),
        train_y=torch.from_numpy(arrays["train_y"]).long(),
        test_x=_to_inputs(arrays["test_x"], card, whitening),
        test_y=torch.from_numpy(arrays["test_y"]).long(),
        card=card,
        whitening=whitening,
    )
