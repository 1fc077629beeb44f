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
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from condense.errors import CondenseError
from condense.store import META, Store, open_store

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
    An fsspec URL (``s3://bucket/store``, ``https://.../export/<key>``, ...) works in place of a local
    export directory or store, for sets copied to object storage.
    """
    manifest, samples = _raw_samples(path, dataset, method, ipc, version)
    return _to_dataset(samples, manifest)


def _raw_samples(
    path: str | Path, dataset: str | None, method: str | None, ipc: int | None, version: int | str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Manifest and raw samples (bytes per field, in key order) of the set ``path`` names."""
    if "://" in str(path):
        return _remote_samples(str(path), dataset, method, ipc, version)
    manifest_path = _locate(Path(path), dataset, method, ipc, version)
    manifest = json.loads(manifest_path.read_text())
    return manifest, _samples(manifest_path, manifest)


def _to_dataset(samples: list[dict[str, Any]], manifest: dict[str, Any]) -> DistilledDataset:
    """Raw shard samples (bytes per field) -> tensors."""
    images = torch.from_numpy(np.stack([_array(s["input.npy"]) for s in samples]))
    labels = torch.tensor([int(s["cls"]) for s in samples])
    soft = None
    if "soft.npy" in samples[0]:
        soft = torch.from_numpy(np.stack([_array(s["soft.npy"]) for s in samples]))
    return DistilledDataset(images, labels, soft, manifest)


def _array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _remote_export(url: str) -> tuple[Any, str]:
    """Filesystem and folder of the export ``url`` names: the folder itself or its manifest, a run
    folder (its summary names the export), or a committed export of a remote store (its meta.json
    names the payload folder that holds the files)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    base = base.rstrip("/").removesuffix(f"/{MANIFEST}")
    if fs.exists(f"{base}/{MANIFEST}"):
        return fs, base
    if fs.exists(f"{base}/summary.json"):
        return _remote_export(json.loads(fs.cat_file(f"{base}/summary.json"))["artifacts"]["manifest"])
    meta = json.loads(fs.cat_file(f"{base}/{META}")) if fs.exists(f"{base}/{META}") else {}
    if "payload" in meta and fs.exists(f"{base}/{meta['payload']}/{MANIFEST}"):
        return fs, f"{base}/{meta['payload']}"
    raise CondenseError(f"no distilled set at {url}: expected {MANIFEST}, a run folder or an export")


def _remote_samples(
    url: str, dataset: str | None, method: str | None, ipc: int | None, version: int | str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Manifest and raw samples of an export on an fsspec filesystem, read as plain tar streams."""
    if any(v is not None for v in (dataset, method, ipc)):
        _require_all_selectors(dataset, method, ipc)
        from condense import versions

        store = open_store(url)
        record = versions.resolve(store, str(dataset), str(method), int(ipc or 0), version)
        url = store.url("export", record["keys"]["export"])
    fs, base = _remote_export(url)
    manifest = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))
    samples: dict[str, dict[str, Any]] = {}
    for shard in manifest["shards"]:
        with fs.open(f"{base}/{shard}", "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                content = tar.extractfile(member)
                if content is None:
                    continue
                key, _, field = member.name.rpartition("/")[2].partition(".")
                samples.setdefault(key, {"__key__": key})[field] = content.read()
    if not samples:
        raise CondenseError(f"distilled set at {url} has no samples")
    return manifest, [samples[k] for k in sorted(samples)]


def _require_all_selectors(dataset: str | None, method: str | None, ipc: int | None) -> None:
    if any(v is None for v in (dataset, method, ipc)):
        raise CondenseError("select a published set with all of dataset, method and ipc")


def _locate(path: Path, dataset: str | None, method: str | None, ipc: int | None, version: int | str) -> Path:
    if all(v is None for v in (dataset, method, ipc)):
        return _find_manifest(path)
    _require_all_selectors(dataset, method, ipc)
    from condense import versions

    store = Store(path)
    record = versions.resolve(store, str(dataset), str(method), int(ipc or 0), version)
    return _find_manifest(versions.export_dir(store, record))


def _samples(manifest_path: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw samples (bytes per field) of a local export, in key order."""
    urls = [str(manifest_path.parent / name) for name in manifest["shards"]]
    samples = sorted(wds.WebDataset(urls, shardshuffle=False), key=lambda s: s["__key__"])
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
    manifest, samples = _raw_samples(path, dataset, method, ipc, version)
    classes = [str(c) for c in manifest["classes"]]
    entries = []
    for sample in samples:
        label = int(sample["cls"])
        relative = Path(classes[label]) / f"{sample['__key__']}.png"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / relative).write_bytes(sample["png"])
        soft = _array(sample["soft.npy"]).tolist() if "soft.npy" in sample else None
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
