"""The public reader of exported distilled sets: ``load_distilled`` (also ``condense.load_distilled``).

Nothing read is trusted: every shard is checked against its manifest (sha256, size, sample count)
before it is decompressed, and no more than the manifest declares is ever read into memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from condense.errors import CondenseError
from condense.export import MANIFEST
from condense.store import META, names, open_store
from condense.synthetic import Stages

MAX_BYTES_ENV = "CONDENSE_MAX_EXPORT_BYTES"
MAX_BYTES = int(os.environ.get(MAX_BYTES_ENV, 16 << 30))
"""The most shard bytes a distilled set may declare (16 GiB: ImageNet-1K at IPC 10 in float32 is
about 6 GB); a set's own manifest bounds each shard far tighter."""


class DistilledDataset(Dataset):
    """(image tensor, hard label, soft label tensor or None) per sample, plus the manifest;
    ``label_logits``: the labels the method learned (DATM, PAD), None when it learned none;
    ``stages``: the stages the set was distilled in (PDD), None when it has none."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        soft: torch.Tensor | None,
        manifest: dict,
        label_logits: torch.Tensor | None = None,
        stages: Stages | None = None,
    ):
        self.images, self.labels, self.soft, self.manifest = images, labels, soft, manifest
        self.label_logits = label_logits
        self.stages = stages

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
    manifest, samples = raw_samples(path, dataset, method, ipc, version, verify, max_bytes)
    return _to_dataset(samples, manifest)


def raw_samples(
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
    labels = torch.tensor([hard_label(s) for s in samples])
    soft = logits = None
    if "soft.npy" in samples[0]:
        soft = _stacked(samples, "soft.npy")
    if "logits.npy" in samples[0]:
        logits = _stacked(samples, "logits.npy")
    return DistilledDataset(images, labels, soft, manifest, logits, manifest_stages(manifest, len(samples)))


def manifest_stages(manifest: dict[str, Any], num_samples: int | None = None) -> Stages | None:
    """The stages a manifest records (None: it records none, as every set exported before stages
    were), checked: one positive whole IPC and one finite step size per stage, and, given
    ``num_samples``, as many images per class in all as the set holds."""
    raw = manifest.get("stages")
    if raw is None:
        return None
    where = f"{MANIFEST}: stages"
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), list) for k in ("ipc", "lrs")):
        raise CondenseError(f"{where} must be {{ipc: [...], lrs: [...]}}")
    ipc, lrs = raw["ipc"], raw["lrs"]
    if not all(type(n) is int and n > 0 for n in ipc):
        raise CondenseError(f"{where}: ipc must be positive whole numbers, not {ipc!r:.80}")
    if not all(type(lr) in (int, float) and np.isfinite(lr) for lr in lrs) or len(lrs) != len(ipc) or not ipc:
        raise CondenseError(f"{where}: lrs must be one finite step size per stage, not {lrs!r:.80}")
    classes = manifest.get("classes")
    if num_samples is not None and isinstance(classes, list) and sum(ipc) * len(classes) != num_samples:
        raise CondenseError(
            f"{where} add up to {sum(ipc)} images per class, but the set holds {num_samples} images of"
            f" {len(classes)} classes"
        )
    return Stages(tuple(ipc), tuple(lrs))


def sample_field(sample: dict[str, Any], name: str) -> bytes:
    """The ``name`` field of a raw sample; one line naming the sample when it has none."""
    if name not in sample:
        raise CondenseError(f"distilled sample {sample['__key__']} has no {name} field")
    return sample[name]


def hard_label(sample: dict[str, Any]) -> int:
    """A raw sample's hard label; one line naming the sample when it is not a class index."""
    raw = sample_field(sample, "cls")
    try:
        value = int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise CondenseError(
            f"distilled sample {sample['__key__']} has cls {raw!r:.40}, not a class index"
        ) from None
    if value < 0:
        raise CondenseError(f"distilled sample {sample['__key__']} has a negative cls {value}")
    return value


def sample_array(sample: dict[str, Any], name: str) -> np.ndarray:
    """The ``.npy`` field ``name`` of a raw sample (never unpickled); one line naming the sample."""
    try:
        return np.load(io.BytesIO(sample_field(sample, name)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CondenseError(f"distilled sample {sample['__key__']}: {name} is not an array ({err})") from None


def _stacked(samples: list[dict[str, Any]], name: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.stack([sample_array(sample, name) for sample in samples]))
    except ValueError as err:
        raise CondenseError(f"distilled set: the {name} arrays differ in shape ({err})") from None


def _require_all_selectors(dataset: str | None, method: str | None, ipc: int | None) -> None:
    if any(v is None for v in (dataset, method, ipc)):
        raise CondenseError("select a published set with all of dataset, method and ipc")
