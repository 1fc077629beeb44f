"""The dataset stage: decode a source once and keep it in the store with its card.

Its key is the content of the source (a fingerprint of the files, or of the decoded arrays where
only decoding tells), never its address: moving the data changes nothing, editing one image redoes
everything downstream. ``ipc`` is checked against the class counts before anything is written, so
a bad request leaves the store as it was.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from condense import datasets, zca
from condense.config import DatasetConfig, PipelineConfig
from condense.errors import DatasetError
from condense.prepare import DATA, STAGE, WHITENING, check_ipc
from condense.stages.base import Context, Job, Params, Stage, execute
from condense.store import Store, save_arrays

_decoded: dict[str, datasets.RawDataset] = {}
"""A source decoded to fingerprint it, kept for the ``run`` of the same job (then dropped)."""
_decoded_lock = threading.Lock()


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    pixels = x.astype(np.float64) / 255.0
    return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()


def card(cfg: DatasetConfig, raw: datasets.RawDataset, fingerprint: str) -> dict[str, Any]:
    """What every later stage needs to know about the data."""
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


def fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    """The source's content fingerprint (decoding it when only decoding tells)."""
    found = datasets.source_fingerprint(cfg.dataset)
    if found is None:
        raw = datasets.load_source(cfg.dataset)
        found = datasets.content_fingerprint(raw)
        with _decoded_lock:
            _decoded[found] = raw
    return {"fingerprint": found}


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    # The content, not its address: the fingerprint stands for the files.
    section = cfg.dataset.model_dump(exclude={"path", "train_urls", "test_urls"})
    return {**section, "fingerprint": params["fingerprint"]}


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg.dataset
    with _decoded_lock:
        raw = _decoded.pop(ctx.params["fingerprint"], None)
    raw = raw or datasets.load_source(cfg)
    described = card(cfg, raw, ctx.params["fingerprint"])
    check_ipc(described, ctx.cfg.ipc)
    splits = {"train_x": raw.train_x, "train_y": raw.train_y, "test_x": raw.test_x, "test_y": raw.test_y}
    save_arrays(ctx.work / DATA, splits)
    if cfg.zca:
        whitening = zca.fit_zca(torch.from_numpy(raw.train_x).float() / 255.0)
        save_arrays(
            ctx.work / WHITENING, {k: getattr(whitening, k).numpy() for k in ("mean", "transform", "inverse")}
        )
    return {"card": described}


STAGE = Stage(name=STAGE, run=run, config=config, resolve=fingerprint)


def prepare(cfg: DatasetConfig, store: Store, ipc: int = 1) -> tuple[str, bool]:
    """The dataset stage on its own, for a notebook or a test: returns (key, was cached)."""
    outcome = execute(Job(stage=STAGE.name, key=""), PipelineConfig(dataset=cfg, ipc=ipc), store)
    return outcome["key"], outcome["cached"]
