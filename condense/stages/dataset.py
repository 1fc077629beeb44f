"""The dataset stage: decode a source once and keep it in the store with its card.

Its key is the content of the source (a fingerprint of the files, or of the decoded arrays where
only decoding tells), never its address: moving the data changes nothing, editing one image redoes
everything downstream. ``ipc`` is checked against the class counts before anything is written, so
a bad request leaves the store as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condense import datasets, streaming, zca
from condense.config import DatasetConfig, PipelineConfig, keyed
from condense.datasets import huggingface, index, shards
from condense.datasets.common import first_per_class, sample_per_class
from condense.errors import DatasetError
from condense.prepare import DATA, INDEX, STAGE, WHITENING, check_ipc
from condense.stages.base import Context, Job, Params, Stage, execute
from condense.store import Store, save_arrays

_decoded: dict[str, datasets.RawDataset | dict[str, index.SplitIndex]] = {}
"""A source decoded (or indexed) to fingerprint it, kept for the ``run`` of the same job (then dropped)."""
_decoded_lock = threading.Lock()


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    pixels = x.astype(np.float64) / 255.0
    return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()


def card(cfg: DatasetConfig, raw: datasets.RawDataset, fingerprint: str) -> dict[str, Any]:
    """What every later stage needs to know about the data."""
    height, width = raw.train_x.shape[2:]
    if height != width:
        raise DatasetError(f"images are {height}x{width}; set dataset.resolution to make them square")
    mean, std = _channel_stats(raw.train_x)
    return _card(
        cfg, fingerprint, raw.classes, raw.train_y, len(raw.test_y), raw.train_x.shape[1:3], mean, std
    )


def _card(
    cfg: DatasetConfig,
    fingerprint: str,
    classes: list[str],
    train_y: np.ndarray,
    test_count: int,
    shape: tuple[int, int],
    mean: list[float],
    std: list[float],
) -> dict[str, Any]:
    channels, resolution = shape
    if cfg.normalize == "imagenet":
        mean = list(streaming.IMAGENET_MEAN[:channels])
        std = list(streaming.IMAGENET_STD[:channels])
    return {
        "name": cfg.name,
        "source": cfg.source,
        "fingerprint": fingerprint,
        "classes": list(classes),
        "class_counts": np.bincount(train_y, minlength=len(classes)).tolist(),
        "channels": int(channels),
        "resolution": int(resolution),
        "train_count": int(len(train_y)),
        "test_count": int(test_count),
        "mean": mean,
        "std": [max(s, 1e-6) for s in std],
        "zca": cfg.zca,
        "load": "memory",
    }


_STREAMED = ("webdataset", "huggingface")


def load_mode(cfg: DatasetConfig) -> str:
    """``memory`` or ``stream``: the setting, or for ``auto`` the size of the encoded training data
    (tar shards, or arrow files)."""
    if cfg.load == "stream" and cfg.source not in _STREAMED:
        raise DatasetError(
            f"dataset.load: stream reads WebDataset shards or a Hugging Face dataset; source {cfg.source!r} "
            "is decoded into memory (write it as shards, or use load: memory)"
        )
    if cfg.load != "auto":
        return cfg.load
    if cfg.source not in _STREAMED:
        return "memory"
    if cfg.source == "huggingface":
        encoded = huggingface.encoded_bytes(cfg)
    else:
        encoded = index.encoded_bytes(shards.shard_urls(cfg)[0])
    return "stream" if encoded is not None and encoded > cfg.stream_above_mb * 2**20 else "memory"


def fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    """The source's content fingerprint (decoding it when only decoding tells) and how it loads."""
    mode = load_mode(cfg.dataset)
    found = datasets.source_fingerprint(cfg.dataset)
    if found is None and mode == "stream":
        # Remote shards are not read twice: the index stands for them (names, byte layout, labels).
        indexed = _index(cfg.dataset)
        listed = shards.listed_classes(cfg.dataset) if cfg.dataset.source == "webdataset" else None
        found = index.fingerprint(indexed.values(), listed[0] if listed else None)
        with _decoded_lock:
            _decoded[found] = indexed
    elif found is None:
        raw = datasets.load_source(cfg.dataset)
        found = datasets.content_fingerprint(raw)
        with _decoded_lock:
            _decoded[found] = raw
    return {"fingerprint": found, "load": mode}


_STREAM_ONLY = {"workers", "shuffle_buffer", "stats_images", "on_corrupt"}


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    # The content, not its address: the fingerprint stands for the files. How the choice of ``load``
    # was made does not matter, only its outcome; workers and the buffer decide a streamed epoch's
    # order, so they are part of a streamed dataset's key.
    unused = {"path", "train_urls", "test_urls", "stream_above_mb", "load"}
    if params["load"] == "memory":
        unused |= _STREAM_ONLY
    section = keyed(cfg.dataset, exclude=unused)
    return {**section, "fingerprint": params["fingerprint"], "load": params["load"]}


def _index(cfg: DatasetConfig) -> dict[str, index.SplitIndex]:
    if cfg.source == "huggingface":
        return huggingface.index_splits(cfg)
    return shards.index_splits(cfg)


def _run_stream(ctx: Context, indexed: dict[str, index.SplitIndex] | None) -> dict[str, Any]:
    """Index the data, check the labels, measure mean/std on a sample; decode nothing else."""
    cfg = ctx.cfg.dataset
    indexed = indexed or _index(cfg)
    located = streaming.locate(cfg)
    for split in ("train", "test"):  # (a Hugging Face split without rows is refused when indexed)
        if not len(indexed[split]):
            raise DatasetError(f"no {split} samples in shards {', '.join(located['urls'][split][:3])}")
    readers = streaming.readers(cfg.source, indexed, located)
    train = indexed["train"].subset(first_per_class(indexed["train"].label, cfg.train_per_class))
    test = indexed["test"]
    if cfg.source == "huggingface":
        classes = huggingface.kept_classes(cfg, readers["train"].classes)
    else:
        classes = shards.kept_classes(cfg)
    classes = index.check_labels(train, test, classes)
    size = cfg.resolution or index.native_side(readers["train"], train)
    decoding = streaming.Decoding(3, size, cfg.transform, "error")
    rows = np.arange(len(train))
    # Fixed ImageNet statistics leave only the channel layout to measure: a small sample does.
    budget = cfg.stats_images if cfg.normalize == "dataset" else min(cfg.stats_images, 256)
    if len(train) > budget:
        generator = torch.Generator().manual_seed(0)
        per_class = max(1, budget // len(classes))
        rows = sample_per_class(torch.from_numpy(train.label), len(classes), per_class, generator).numpy()
        rows.sort()
    channels, mean, std = streaming.channel_stats(readers["train"], train, rows, decoding)
    described = _card(
        cfg, ctx.params["fingerprint"], classes, train.label, len(test), (channels, size), mean, std
    )
    described.update(
        load="stream",
        transform=cfg.transform,
        on_corrupt=cfg.on_corrupt,
        workers=cfg.workers,
        shuffle_buffer=cfg.shuffle_buffer,
        stats_images=int(len(rows)),
        skipped={split: indexed[split].skipped_count for split in ("train", "test")},
        skipped_examples=indexed["train"].skipped + indexed["test"].skipped,
    )
    check_ipc(described, ctx.cfg.ipc)
    save_arrays(ctx.work / INDEX, {**train.arrays("train"), **test.arrays("test")})
    if cfg.zca:
        how = streaming.Decoding(channels, size, cfg.transform, "error")

        def chunks() -> Iterator[torch.Tensor]:
            # The in-memory fit's chunks of the same images: the same whitening, to the bit.
            for start in range(0, len(rows), zca.CHUNK):
                part = streaming.read_pixels(readers["train"], train, rows[start : start + zca.CHUNK], how, 4)
                yield torch.from_numpy(part).float().div(255.0).reshape(len(part), -1)

        _save_whitening(ctx.work, zca.fit_zca_chunks(chunks))
    return {"card": described, "shards": {"train": train.shards, "test": test.shards}, **located}


def _save_whitening(work: Path, whitening: zca.ZCA) -> None:
    save_arrays(
        work / WHITENING, {k: getattr(whitening, k).numpy() for k in ("mean", "transform", "inverse")}
    )


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg.dataset
    with _decoded_lock:
        decoded = _decoded.pop(ctx.params["fingerprint"], None)
    if ctx.params["load"] == "stream":
        return _run_stream(ctx, decoded if isinstance(decoded, dict) else None)
    raw = decoded if isinstance(decoded, datasets.RawDataset) else datasets.load_source(cfg)
    described = card(cfg, raw, ctx.params["fingerprint"])
    check_ipc(described, ctx.cfg.ipc)
    splits = {"train_x": raw.train_x, "train_y": raw.train_y, "test_x": raw.test_x, "test_y": raw.test_y}
    save_arrays(ctx.work / DATA, splits)
    if cfg.zca:
        _save_whitening(ctx.work, zca.fit_zca(torch.from_numpy(raw.train_x).float() / 255.0))
    return {"card": described}


STAGE = Stage(name=STAGE, run=run, config=config, resolve=fingerprint)


def prepare(cfg: DatasetConfig, store: Store, ipc: int = 1) -> tuple[str, bool]:
    """The dataset stage on its own, for a notebook or a test: returns (key, was cached)."""
    outcome = execute(Job(stage=STAGE.name, key=""), PipelineConfig(dataset=cfg, ipc=ipc), store)
    return outcome["key"], outcome["cached"]
