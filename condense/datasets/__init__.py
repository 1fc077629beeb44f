"""Real data sources, decoded into one uint8 array per split: digits, WebDataset shards, image
folders, torchvision datasets, Hugging Face datasets. One module per source; :data:`SOURCES` is the
one dispatcher.

Every source applies the same settings (``resolution``, ``train_per_class``) and the same checks
(every class has training images, labels fit the classes, splits agree in shape).
"""

from __future__ import annotations

from condense.config import DatasetConfig
from condense.datasets import digits, folder, huggingface, shards, torchvision
from condense.datasets.common import RawDataset, Source, content_fingerprint

SOURCES: dict[str, Source] = {
    s.name: s for s in (digits.SOURCE, shards.SOURCE, folder.SOURCE, torchvision.SOURCE, huggingface.SOURCE)
}


def load_source(cfg: DatasetConfig) -> RawDataset:
    """Read and decode the real data (train and test splits), applying resolution and train_per_class."""
    return SOURCES[cfg.source].load(cfg)


def source_fingerprint(cfg: DatasetConfig) -> str | None:
    """sha256 hex of the source's content, computed without decoding; None when only decoding tells
    (remote shards, torchvision and hub datasets: use :func:`content_fingerprint` after loading). The
    settings that change the decoded arrays (source, resolution, train_per_class) are mixed in."""
    return SOURCES[cfg.source].fingerprint(cfg)


__all__ = ["SOURCES", "RawDataset", "Source", "content_fingerprint", "load_source", "source_fingerprint"]
