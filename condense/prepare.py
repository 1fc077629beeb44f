"""The prepared dataset: what the dataset stage stored, loaded as network-ready tensors.

The card records what every later stage needs to know about the data: fingerprint, classes and
their counts, shape, and the per-channel mean/std of the training split used to normalise inputs.
With ``zca: true`` inputs are ZCA-whitened instead (MTT's convention: no mean/std step before ZCA).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from condense import zca
from condense.config import DatasetConfig
from condense.devices import upload
from condense.errors import DatasetError
from condense.store import Store, load_arrays
from condense.streaming import CardShape, StreamedDataset, open_streamed

STAGE = "dataset"
DATA = "data.zarr"
INDEX = "index.zarr"
WHITENING = "zca.zarr"


@dataclass
class PreparedDataset(CardShape):
    """Network-ready tensors (normalised or whitened) and the card describing them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    card: dict[str, Any]
    whitening: zca.ZCA | None = None

    streamed = False

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """Network inputs of the training images at ``idx`` (the streamed dataset reads only these)."""
        return self.train_x[upload(idx, self.train_x.device)]

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``split`` as (inputs, labels): in a random order drawn from ``generator``, in
        order without one."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if generator is None:
            yield from zip(torch.split(x, batch_size), torch.split(y, batch_size), strict=True)
            return
        for idx in torch.split(upload(torch.randperm(len(x), generator=generator), x.device), batch_size):
            yield x[idx], y[idx]

    def to(self, device: torch.device | str) -> PreparedDataset:
        """The same data with its tensors on ``device`` (this object when they are there already)."""
        if self.train_x.device == torch.device(device):
            return self
        moved = {name: getattr(self, name).to(device) for name in ("train_x", "train_y", "test_x", "test_y")}
        return dataclasses.replace(self, **moved)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Back from network inputs to viewable [0, 1] pixels (inverse whitening or normalisation), on
        the CPU."""
        x = x.detach().cpu()
        if self.whitening is not None:
            x = zca.invert_zca(x, self.whitening)
        else:
            mean = torch.tensor(self.card["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(self.card["std"]).view(1, -1, 1, 1)
            x = x * std + mean
        return x.clamp(0, 1)


RealData = PreparedDataset | StreamedDataset
"""Real data in memory or streamed: ``train_y``/``test_y``, ``images(idx)``, ``batches(split, ...)``,
the card's shape; only the in-memory kind has ``train_x``/``test_x``."""


def _to_inputs(
    x: np.ndarray, card: dict[str, Any], whitening: zca.ZCA | None, device: torch.device
) -> torch.Tensor:
    """Stored uint8 pixels -> network inputs on ``device``: the bytes travel (a quarter of the
    floats), the conversion and the whitening run there."""
    pixels = upload(torch.from_numpy(x), device).float() / 255.0
    if whitening is not None:
        return zca.apply_zca(
            pixels,
            zca.ZCA(upload(whitening.mean, device), upload(whitening.transform, device), whitening.inverse),
        )
    mean = upload(torch.tensor(card["mean"]), device).view(1, -1, 1, 1)
    std = upload(torch.tensor(card["std"]), device).view(1, -1, 1, 1)
    return (pixels - mean) / std


def load(
    store: Store, key: str, cfg: DatasetConfig | None = None, device: torch.device | str = "cpu"
) -> RealData:
    """The stored dataset as network inputs on ``device``; a streamed one reads its shards where
    ``cfg`` says they are now (where they were indexed without it)."""
    device = torch.device(device)
    meta = store.meta(STAGE, key)
    card = meta["card"]
    whitening = None
    if card["zca"]:
        z = load_arrays(store.path(STAGE, key) / WHITENING)
        whitening = zca.ZCA(**{k: torch.from_numpy(v) for k, v in z.items()})
    if card.get("load") == "stream":
        return open_streamed(store.path(STAGE, key) / INDEX, meta, cfg, whitening).to(device)
    arrays = load_arrays(store.path(STAGE, key) / DATA)
    return PreparedDataset(
        train_x=_to_inputs(arrays["train_x"], card, whitening, device),
        train_y=upload(torch.from_numpy(arrays["train_y"]).long(), device),
        test_x=_to_inputs(arrays["test_x"], card, whitening, device),
        test_y=upload(torch.from_numpy(arrays["test_y"]).long(), device),
        card=card,
        whitening=whitening,
    )


RESIDENT_DATASETS = 2
"""In-memory datasets a process keeps prepared (per store, key and device) for its next jobs."""
_resident: dict[tuple[str, str, str], PreparedDataset] = {}
_resident_lock = threading.Lock()


def load_once(store: Store, key: str, cfg: DatasetConfig, device: torch.device) -> RealData:
    """:func:`load`, prepared once per process for each (store, dataset key, device): the jobs of a
    pipeline (experts, distillation, every evaluation) share one copy instead of each reading and
    whitening the whole dataset again. A key names its content, so a kept copy never goes stale;
    the last :data:`RESIDENT_DATASETS` are kept. Streamed datasets are opened per job (they hold
    open shard readers, and their point is to keep nothing resident)."""
    name = (store.location, key, str(device))
    with _resident_lock:  # one reader per process: concurrent jobs wait for the first's copy
        data = _resident.pop(name, None)
        if data is None:
            loaded = load(store, key, cfg, device)
            if not isinstance(loaded, PreparedDataset):
                return loaded
            data = loaded
        _resident[name] = data  # most recently used last
        while len(_resident) > RESIDENT_DATASETS:
            del _resident[next(iter(_resident))]
    return data


INPUT_STD_SAMPLE = 512
"""Real training images drawn to measure the data's input scale (enough for two decimals)."""


def _std(x: torch.Tensor) -> float:
    return float(x.detach().double().std(unbiased=False))


def input_std(data: RealData, synthetic: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The standard deviation of a synthetic set's inputs and of the real training inputs
    (normalised or whitened, as networks see them; a seeded sample of :data:`INPUT_STD_SAMPLE`
    images): BatchNorm architectures trained on a set of another scale meet test images at the
    real one."""
    generator = torch.Generator().manual_seed(seed)
    count = len(data.train_y)
    idx = torch.randperm(count, generator=generator)[: min(INPUT_STD_SAMPLE, count)].sort().values
    return {"synthetic": _std(synthetic), "real": _std(data.images(idx))}


def check_ipc(card: dict[str, Any], ipc: int) -> None:
    """``ipc`` real images per class must exist (for the random-real baseline and real initialisation)."""
    smallest = min(card["class_counts"])
    if ipc > smallest:
        cls = card["classes"][card["class_counts"].index(smallest)]
        raise DatasetError(
            f"ipc={ipc} is larger than the smallest class ({cls!r} has {smallest} training images)"
        )
