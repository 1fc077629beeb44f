"""A distilled set as WebDataset shards plus a JSON manifest, readable with ``webdataset`` alone.

Each sample holds:

- ``input.npy``: the image as the network sees it (float32 C x H x W, normalised or ZCA-whitened as
  the manifest's ``preprocessing`` says); train on this;
- ``png``: the same image as viewable pixels (inverse normalisation), for eyes and image tools;
- ``cls``: the hard label; ``soft.npy``: the teacher's probabilities, when soft labels exist;
- ``logits.npy``: the label logits the method learned (DATM, PAD), when it learned labels; train
  with soft cross-entropy against their softmax, as the method's own evaluation does (the
  manifest's ``labels`` says ``learned``).

A set distilled in stages (PDD) has ``stages`` in its manifest: ``{"ipc": [...], "lrs": [...]}``,
the images per class each stage added and each stage's learned step size
(:class:`condense.synthetic.Stages`); samples stay class-major, stage 1's images first in each class.

Written by the export stage (:func:`write_distilled`); read back by :mod:`condense.distilled`
(``load_distilled``); converted to other formats by :mod:`condense.convert`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from condense.synthetic import Stages

MANIFEST = "manifest.json"
SHARD_PATTERN = "distilled-%06d.tar"
GRID = "grid.png"


def _png(pixels: np.ndarray) -> bytes:
    """(C, H, W) floats in [0, 1] -> PNG bytes."""
    array = (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def stages_json(stages: Stages) -> dict[str, list[Any]]:
    """How a manifest records a set's stages."""
    return {"ipc": list(stages.ipc), "lrs": list(stages.lrs)}


def write_distilled(
    out_dir: Path,
    images: np.ndarray,
    pixels: np.ndarray,
    labels: np.ndarray,
    soft: np.ndarray | None,
    manifest: dict[str, Any],
    max_per_shard: int = 10_000,
    label_logits: np.ndarray | None = None,
    stages: Stages | None = None,
) -> list[Path]:
    """Write the shards and ``manifest.json`` into ``out_dir``; returns the shard paths. ``stages``:
    the set's stages, recorded in the manifest (none: the manifest has no ``stages``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out_dir / SHARD_PATTERN), maxcount=max_per_shard, verbose=0) as sink:
        for i in range(len(images)):
            sample = {
                "__key__": f"{i:06d}",
                "input.npy": _npy(images[i].astype(np.float32)),
                "png": _png(pixels[i]),
                "cls": str(int(labels[i])).encode(),
            }
            if soft is not None:
                sample["soft.npy"] = _npy(soft[i].astype(np.float32))
            if label_logits is not None:
                sample["logits.npy"] = _npy(label_logits[i].astype(np.float32))
            sink.write(sample)
    shards = sorted(out_dir.glob("distilled-*.tar"))
    manifest = {
        **manifest,
        "shards": [p.name for p in shards],
        "shard_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards},
        "shard_bytes": {p.name: p.stat().st_size for p in shards},
        "num_samples": len(images),
        "labels": "hard" if label_logits is None else "learned",
    }
    if stages is not None:
        manifest["stages"] = stages_json(stages)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return shards
