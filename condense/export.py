"""A distilled set as WebDataset shards plus a JSON manifest, readable with ``webdataset`` alone.

Each sample holds:

- ``input.npy``: the image as the network sees it (float32 C x H x W, normalised or ZCA-whitened as
  the manifest's ``preprocessing`` says); train on this;
- ``png``: the same image as viewable pixels (inverse normalisation), for eyes and image tools;
- ``cls``: the hard label; ``soft.npy``: the teacher's probabilities, when soft labels exist.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from condense.errors import CondenseError

MANIFEST = "manifest.json"
SHARD_PATTERN = "distilled-%06d.tar"


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


def image_grid(pixels: np.ndarray, per_row: int, min_side: int = 32) -> Image.Image:
    """A grid of (n, C, H, W) [0, 1] images, ``per_row`` per row (one row per class), upscaled so
    tiny images (8 px digits) stay visible."""
    n, channels, height, width = pixels.shape
    scale = max(1, -(-min_side // height))
    pad = 2
    rows = -(-n // per_row)
    canvas = np.ones((rows * (height * scale + pad) + pad, per_row * (width * scale + pad) + pad, 3))
    for i, img in enumerate(pixels):
        tile = np.clip(img, 0, 1).transpose(1, 2, 0)
        tile = np.repeat(np.repeat(tile, scale, 0), scale, 1)
        if channels == 1:
            tile = np.repeat(tile, 3, 2)
        r, c = divmod(i, per_row)
        y, x = pad + r * (height * scale + pad), pad + c * (width * scale + pad)
        canvas[y : y + height * scale, x : x + width * scale] = tile
    return Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))


def write_distilled(
    out_dir: Path,
    images: np.ndarray,
    pixels: np.ndarray,
    labels: np.ndarray,
    soft: np.ndarray | None,
    manifest: dict[str, Any],
    max_per_shard: int = 10_000,
) -> list[Path]:
    """Write the shards and ``manifest.json`` into ``out_dir``; returns the shard paths."""
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
            sink.write(sample)
    shards = sorted(out_dir.glob("distilled-*.tar"))
    manifest = {**manifest, "shards": [p.name for p in shards], "num_samples": len(images)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return shards


def _find_manifest(path: Path) -> Path:
    """Accept an export directory, its manifest, or a run folder (whose summary points to it)."""
    if path.is_file() and path.name == MANIFEST:
        return path
    if (path / MANIFEST).is_file():
        return path / MANIFEST
    if (path / "summary.json").is_file():
        return Path(json.loads((path / "summary.json").read_text())["artifacts"]["manifest"])
    raise CondenseError(f"no distilled set at {path}: expected a directory with {MANIFEST} or a run folder")


class DistilledDataset(Dataset):
    """(image tensor, hard label, soft label tensor or None) per sample, plus the manifest."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, manifest: dict):
        self.images, self.labels, self.soft, self.manifest = images, labels, soft, manifest

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        return self.images[i], int(self.labels[i]), None if self.soft is None else self.soft[i]


def load_distilled(
    path: str | Path,
    dataset: str | None = None,
    method: str | None = None,
    ipc: int | None = None,
    version: int | str = "latest",
) -> DistilledDataset:
    """Load a distilled set exported by the pipeline.

    ``path`` is a run folder, an export directory or its manifest; or, with ``dataset``, ``method``
    and ``ipc``, a store, from which ``version`` (``"latest"`` or a number) of that set is loaded.
    """
    manifest_path = _locate(Path(path), dataset, method, ipc, version)
    manifest = json.loads(manifest_path.read_text())
    samples = _samples(manifest_path, manifest, decode=True)
    images = torch.from_numpy(np.stack([s["input.npy"] for s in samples]))
    labels = torch.tensor([int(s["cls"]) for s in samples])
    soft = None
    if "soft.npy" in samples[0]:
        soft = torch.from_numpy(np.stack([s["soft.npy"] for s in samples]))
    return DistilledDataset(images, labels, soft, manifest)


def _locate(path: Path, dataset: str | None, method: str | None, ipc: int | None, version: int | str) -> Path:
    selectors = (dataset, method, ipc)
    if all(v is None for v in selectors):
        return _find_manifest(path)
    if any(v is None for v in selectors):
        raise CondenseError("select a published set with all of dataset, method and ipc")
    from condense import versions
    from condense.store import Store

    store = Store(path)
    record = versions.resolve(store, str(dataset), str(method), int(ipc or 0), version)
    return _find_manifest(versions.export_dir(store, record))


def _samples(manifest_path: Path, manifest: dict[str, Any], decode: bool) -> list[dict[str, Any]]:
    urls = [str(manifest_path.parent / name) for name in manifest["shards"]]
    pipeline = wds.WebDataset(urls, shardshuffle=False)
    samples = sorted(pipeline.decode() if decode else pipeline, key=lambda s: s["__key__"])
    if not samples:
        raise CondenseError(f"distilled set at {manifest_path.parent} has no samples")
    return samples


def write_image_folder(
    path: str | Path,
    out_dir: Path,
    dataset: str | None = None,
    method: str | None = None,
    ipc: int | None = None,
    version: int | str = "latest",
) -> Path:
    """Export a distilled set as ``<out>/<class>/<index>.png`` plus ``labels.json`` (class names,
    and per file its hard label and soft label), for tools that read image folders."""
    manifest_path = _locate(Path(path), dataset, method, ipc, version)
    manifest = json.loads(manifest_path.read_text())
    classes = [str(c) for c in manifest["classes"]]
    entries = []
    for sample in _samples(manifest_path, manifest, decode=False):
        label = int(sample["cls"])
        relative = Path(classes[label]) / f"{sample['__key__']}.png"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / relative).write_bytes(sample["png"])
        soft = np.load(io.BytesIO(sample["soft.npy"])).tolist() if "soft.npy" in sample else None
        entries.append({"file": relative.as_posix(), "label": label, "soft": soft})
    labels = {
        "classes": classes,
        "method": manifest["method"],
        "ipc": manifest["ipc"],
        "source_fingerprint": manifest["source_fingerprint"],
        "images": entries,
    }
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=2))
    return out_dir
