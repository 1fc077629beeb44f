"""A distilled set as WebDataset shards plus a JSON manifest, readable with ``webdataset`` alone.

Each sample holds:

- ``input.npy``: the image as the network sees it (float32 C x H x W, normalised or ZCA-whitened as
  the manifest's ``preprocessing`` says); train on this;
- ``png``: the same image as viewable pixels (inverse normalisation), for eyes and image tools;
- ``cls``: the hard label; ``soft.npy``: the teacher's probabilities, when soft labels exist;
- ``logits.npy``: the label logits the method learned (DATM, PAD), when it learned labels; train
  with soft cross-entropy against their softmax, as the method's own evaluation does (the
  manifest's ``labels`` says ``learned``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from condense.errors import CondenseError
from condense.store import META, names, open_store

MANIFEST = "manifest.json"
SHARD_PATTERN = "distilled-%06d.tar"
MAX_BYTES_ENV = "CONDENSE_MAX_EXPORT_BYTES"
MAX_BYTES = int(os.environ.get(MAX_BYTES_ENV, 16 << 30))
"""The most shard bytes a distilled set may declare (16 GiB: ImageNet-1K at IPC 10 in float32 is
about 6 GB); a set's own manifest bounds each shard far tighter."""
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
    label_logits: np.ndarray | None = None,
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
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return shards


class DistilledDataset(Dataset):
    """(image tensor, hard label, soft label tensor or None) per sample, plus the manifest;
    ``label_logits``: the labels the method learned (DATM, PAD), None when it learned none."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        soft: torch.Tensor | None,
        manifest: dict,
        label_logits: torch.Tensor | None = None,
    ):
        self.images, self.labels, self.soft, self.manifest = images, labels, soft, manifest
        self.label_logits = label_logits

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
    verify: bool = True,
    max_bytes: int = MAX_BYTES,
) -> DistilledDataset:
    """Load a distilled set exported by the pipeline.

    ``path`` is a run folder, an export directory or its manifest; or, with ``dataset``, ``method``
    and ``ipc``, a store, from which ``version`` (``"latest"`` or a number) of that set is loaded.
    An fsspec URL (``s3://bucket/store``, ``https://.../export/<key>``, ...) works in place of a local
    export directory or store, for sets copied to object storage.

    Every shard is checked against the manifest (its sha256, its size, the number of samples) and
    nothing beyond the sizes it declares is decompressed; a manifest without those checks is refused
    unless ``verify=False`` (a set written by hand). ``max_bytes`` caps what a set may declare.
    """
    manifest, samples = _raw_samples(path, dataset, method, ipc, version, verify, max_bytes)
    return _to_dataset(samples, manifest)


def _raw_samples(
    path: str | Path,
    dataset: str | None,
    method: str | None,
    ipc: int | None,
    version: int | str,
    verify: bool = True,
    max_bytes: int = MAX_BYTES,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Manifest and raw samples (bytes per field, in key order) of the set ``path`` names, checked
    against the manifest: every shard's sha256 and size, and the number of samples."""
    fs, folder = _export_folder(str(path), dataset, method, ipc, version)
    try:
        manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CondenseError(f"distilled set at {folder}: {MANIFEST} is not valid JSON") from None
    shards = _checked_shards(manifest, folder, verify, max_bytes)
    samples: dict[str, dict[str, Any]] = {}
    for shard in shards:
        blob = fs.cat_file(f"{folder}/{shard}")
        expected = manifest.get("shard_sha256", {}).get(shard)
        if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
            raise CondenseError(f"distilled set at {folder} is damaged: {shard} does not match its manifest")
        limit = manifest.get("shard_bytes", {}).get(shard, max_bytes)
        tar = _bounded_tar(blob, limit, f"{folder}/{shard}")
        for key, fields in _shard_samples(tar, f"{folder}/{shard}").items():
            samples.setdefault(key, {"__key__": key}).update(fields)
    if not samples:
        raise CondenseError(f"distilled set at {folder} has no samples")
    if len(samples) != manifest.get("num_samples", len(samples)):
        raise CondenseError(
            f"distilled set at {folder} is damaged: {len(samples)} samples, its manifest lists"
            f" {manifest['num_samples']}"
        )
    return manifest, [samples[k] for k in sorted(samples)]


SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")
CHECKS = ("shard_sha256", "shard_bytes", "num_samples")


def _checked_shards(manifest: Any, folder: str, verify: bool, max_bytes: int) -> list[str]:
    """The manifest's shard names, each a plain file name, once its checks are all there (unless
    ``verify`` is off) and the sizes it declares fit in ``max_bytes``."""
    where = f"distilled set at {folder}: {MANIFEST}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise CondenseError(f"{where} lists no shards")
    shards = [names.component(s, "shard", where) for s in manifest["shards"]]
    if verify:
        missing = [c for c in CHECKS if c not in manifest]
        declared = manifest.get("shard_sha256", {}), manifest.get("shard_bytes", {})
        if missing or not all(isinstance(d, dict) and set(shards) <= set(d) for d in declared):
            raise CondenseError(
                f"{where} lacks its checks ({', '.join(missing) or 'a shard without its sha256 or size'}):"
                " load it with verify=False only if you trust where it came from"
            )
    sizes = manifest.get("shard_bytes", {})
    if not isinstance(sizes, dict) or any(
        type(sizes.get(s, 0)) is not int or sizes.get(s, 0) < 0 for s in shards
    ):
        raise CondenseError(f"{where}: shard_bytes must give each shard's size in bytes")
    total = sum(sizes.get(s, 0) for s in shards)
    if total > max_bytes:
        raise CondenseError(
            f"{where} declares {total} bytes of shards, over the cap of {max_bytes} bytes (max_bytes=, or"
            f" {MAX_BYTES_ENV}, raises it)"
        )
    return shards


def _bounded_tar(blob: bytes, limit: int, where: str) -> bytes:
    """The tar in ``blob``, decompressed when it is gzip, never past ``limit`` bytes: a small shard
    that inflates to gigabytes is refused before it is resident."""
    if blob[:2] != b"\x1f\x8b":
        if len(blob) > limit:
            raise CondenseError(
                f"distilled set shard {where} is {len(blob)} bytes, its manifest says {limit}"
            )
        return blob
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        tar = inflate.decompress(blob, limit + 1)
    except zlib.error as err:
        raise CondenseError(f"distilled set shard {where} is unreadable: {err}") from None
    if len(tar) > limit:
        raise CondenseError(
            f"distilled set shard {where} inflates past the {limit} bytes its manifest declares"
        )
    return tar


def _shard_samples(blob: bytes, where: str) -> dict[str, dict[str, bytes]]:
    """{sample key: {field: bytes}} of one WebDataset shard (an uncompressed tar); keys are plain names."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, field = member.name.partition(".")
                if not SAMPLE_KEY.fullmatch(key):  # no folders, no "..": exports hold flat samples
                    raise CondenseError(
                        f"{where} holds a member named {member.name!r}: not a plain sample key"
                    )
                content = tar.extractfile(member)
                assert content is not None
                samples.setdefault(key, {})[field] = content.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CondenseError(f"distilled set shard {where} is unreadable: {err}") from None
    return samples


def _export_folder(
    path: str, dataset: str | None, method: str | None, ipc: int | None, version: int | str
) -> tuple[Any, str]:
    """Filesystem and folder of the export ``path`` names: with dataset/method/ipc, a version in a
    store; else the folder itself or its manifest, a run folder (the export beside it in its store),
    or a committed export of a remote store (its meta.json names the payload folder)."""
    import fsspec

    if any(v is not None for v in (dataset, method, ipc)):
        _require_all_selectors(dataset, method, ipc)
        from condense import versions

        store = open_store(path)
        record = versions.resolve(store, str(dataset), str(method), int(ipc or 0), version)
        key = record["keys"]["export"]
        path = store.url("export", key) if "://" in store.location else str(store.path("export", key))
    fs, base = fsspec.core.url_to_fs(path)
    base = base.rstrip("/").removesuffix(f"/{MANIFEST}")
    if fs.isfile(f"{base}/{MANIFEST}"):
        return fs, base
    if fs.isfile(f"{base}/summary.json"):
        summary = json.loads(fs.cat_file(f"{base}/summary.json"))
        export_key = names.stage_key(
            summary.get("keys", {}).get("export"), "export key", f"run summary {base}/summary.json"
        )
        # The run's store is two levels up: a copied or moved store finds its own export.
        beside = f"{posixpath.dirname(posixpath.dirname(base))}/export/{export_key}"
        for candidate in (beside, summary["artifacts"]["manifest"].removesuffix(f"/{MANIFEST}")):
            try:
                return _export_folder(candidate, None, None, None, version)
            except CondenseError:
                continue
    if fs.isfile(f"{base}/{META}"):
        payload = json.loads(fs.cat_file(f"{base}/{META}")).get("payload")
        if payload is not None:
            names.component(payload, "payload", f"{base}/{META}")
        if payload and fs.isfile(f"{base}/{payload}/{MANIFEST}"):
            return fs, f"{base}/{payload}"
    raise CondenseError(f"no distilled set at {path}: expected {MANIFEST}, a run folder or an export")


def _to_dataset(samples: list[dict[str, Any]], manifest: dict[str, Any]) -> DistilledDataset:
    """Raw shard samples (bytes per field) -> tensors."""
    images = _stacked(samples, "input.npy")
    labels = torch.tensor([_hard_label(s) for s in samples])
    soft = logits = None
    if "soft.npy" in samples[0]:
        soft = _stacked(samples, "soft.npy")
    if "logits.npy" in samples[0]:
        logits = _stacked(samples, "logits.npy")
    return DistilledDataset(images, labels, soft, manifest, logits)


def _field(sample: dict[str, Any], name: str) -> bytes:
    """The ``name`` field of a raw sample; one line naming the sample when it has none."""
    if name not in sample:
        raise CondenseError(f"distilled sample {sample['__key__']} has no {name} field")
    return sample[name]


def _hard_label(sample: dict[str, Any]) -> int:
    """A raw sample's hard label; one line naming the sample when it is not a class index."""
    raw = _field(sample, "cls")
    try:
        value = int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise CondenseError(
            f"distilled sample {sample['__key__']} has cls {raw!r:.40}, not a class index"
        ) from None
    if value < 0:
        raise CondenseError(f"distilled sample {sample['__key__']} has a negative cls {value}")
    return value


def _array(sample: dict[str, Any], name: str) -> np.ndarray:
    """The ``.npy`` field ``name`` of a raw sample (never unpickled); one line naming the sample."""
    try:
        return np.load(io.BytesIO(_field(sample, name)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CondenseError(f"distilled sample {sample['__key__']}: {name} is not an array ({err})") from None


def _stacked(samples: list[dict[str, Any]], name: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.stack([_array(sample, name) for sample in samples]))
    except ValueError as err:
        raise CondenseError(f"distilled set: the {name} arrays differ in shape ({err})") from None


def _require_all_selectors(dataset: str | None, method: str | None, ipc: int | None) -> None:
    if any(v is None for v in (dataset, method, ipc)):
        raise CondenseError("select a published set with all of dataset, method and ipc")


def folder_names(classes: list[str]) -> list[str]:
    """A safe, distinct folder name per class: letters, digits, ``.``, ``_``, ``-`` and spaces kept,
    anything else (path separators, ``..``) replaced, so no class name can point outside the export."""
    names: list[str] = []
    for index, name in enumerate(classes):
        safe = re.sub(r"[^\w .-]", "_", str(name)).strip(" ").lstrip(".") or f"class_{index}"
        names.append(safe if safe not in names else f"{safe}_{index}")
    return names


def write_image_folder(
    path: str | Path,
    out_dir: Path,
    dataset: str | None = None,
    method: str | None = None,
    ipc: int | None = None,
    version: int | str = "latest",
    overwrite: bool = False,
) -> Path:
    """Export a distilled set as ``<out>/<class>/<index>.png`` plus ``labels.json`` (class names,
    and per file its hard label and soft label), for tools that read image folders.

    The folder is written beside ``out_dir`` and renamed into place whole: a non-empty ``out_dir`` is
    refused unless ``overwrite`` (then replaced, never mixed with what was there)."""
    out_dir = _target(out_dir, overwrite)
    manifest, samples = _raw_samples(path, dataset, method, ipc, version)
    classes = [str(c) for c in manifest["classes"]]
    folders = folder_names(classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        entries = []
        for sample in samples:
            label = _label(sample, classes)
            relative = Path(folders[label]) / f"{sample['__key__']}.png"
            target = (staging / relative).resolve()
            if not target.is_relative_to(staging.resolve()):
                raise CondenseError(f"refusing to write {relative} outside {out_dir}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_field(sample, "png"))
            soft = _array(sample, "soft.npy").tolist() if "soft.npy" in sample else None
            entry = {"file": relative.as_posix(), "label": label, "soft": soft}
            if "logits.npy" in sample:
                entry["logits"] = _array(sample, "logits.npy").tolist()
            entries.append(entry)
        labels = {
            "classes": classes,
            "method": manifest["method"],
            "ipc": manifest["ipc"],
            "source_fingerprint": manifest["source_fingerprint"],
            "images": entries,
        }
        (staging / "labels.json").write_text(json.dumps(labels, indent=2))
        _replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _target(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` made absolute, refused when it is a file or (unless ``overwrite``) not empty."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise CondenseError(f"--to {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CondenseError(f"--to {out_dir} is not empty; pass --overwrite to replace it")
    return out_dir


def _label(sample: dict[str, Any], classes: list[str]) -> int:
    label = _hard_label(sample)
    if not 0 <= label < len(classes):
        raise CondenseError(f"sample {sample['__key__']} has class {label}, outside 0..{len(classes) - 1}")
    return label


HF_MISSING = "--format hf needs the 'datasets' package: pip install 'condense[hf]'"


def write_hf_dataset(
    path: str | Path,
    out_dir: Path,
    dataset: str | None = None,
    method: str | None = None,
    ipc: int | None = None,
    version: int | str = "latest",
    overwrite: bool = False,
) -> Path:
    """Export a distilled set as a Hugging Face ``datasets`` folder (``DatasetDict.save_to_disk``)
    with one ``train`` split and the columns:

    - ``image``: an ``Image`` feature, the viewable PNG (as the image-folder export writes it);
    - ``label``: a ``ClassLabel`` whose names are the set's class names;
    - ``soft_label``: float32 list, the teacher's probabilities, when the set has soft labels;
    - ``logits``: float32 list, the label logits the method learned (DATM, PAD), when it learned them.

    The dataset's description is JSON: method, IPC, source fingerprint. Read it with
    ``datasets.load_from_disk(out)`` (or ``dataset.source: huggingface, dataset.path: out``, which
    finds images and labels by their features); publish it with
    ``datasets.DatasetDict.load_from_disk(out).push_to_hub("user/name")`` (after ``hf auth login``).
    Written beside ``out_dir`` and renamed into place whole, like :func:`write_image_folder`.
    """
    try:
        import datasets as hf
    except ImportError:
        raise CondenseError(HF_MISSING) from None
    out_dir = _target(out_dir, overwrite)
    manifest, samples = _raw_samples(path, dataset, method, ipc, version)
    classes = [str(c) for c in manifest["classes"]]
    columns: dict[str, list[Any]] = {
        "image": [{"bytes": _field(s, "png"), "path": None} for s in samples],
        "label": [_label(s, classes) for s in samples],
    }
    features = {"image": hf.Image(), "label": hf.ClassLabel(names=classes)}
    for column, field in (("soft_label", "soft.npy"), ("logits", "logits.npy")):
        if field in samples[0]:
            columns[column] = [_array(s, field).astype(np.float32).reshape(-1) for s in samples]
            features[column] = hf.Sequence(hf.Value("float32"))
    about = {k: manifest.get(k) for k in ("method", "ipc", "source_fingerprint")}
    schema = hf.Features(features)
    info = hf.DatasetInfo(description=json.dumps(about, sort_keys=True, default=str), features=schema)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    quiet = not hf.are_progress_bars_disabled()
    if quiet:
        hf.disable_progress_bars()
    try:
        split = hf.Dataset.from_dict(columns, features=schema, info=info)
        hf.DatasetDict({"train": split}).save_to_disk(str(staging))
        _replace(staging, out_dir)
    finally:
        if quiet:
            hf.enable_progress_bars()
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _replace(staging: Path, out_dir: Path) -> None:
    """Put ``staging`` at ``out_dir``; what was there is removed only once the new folder is in."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out_dir)
