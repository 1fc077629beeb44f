"""Format converters of an exported distilled set: an image folder (``<class>/<n>.png`` plus
``labels.json``) and a Hugging Face ``datasets`` folder. Both read through :mod:`condense.distilled`,
so they check the set as ``load_distilled`` does."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from condense.distilled import hard_label, manifest_stages, raw_samples, sample_array, sample_field
from condense.errors import CondenseError
from condense.export import stages_json
from condense.folders import replace_folder, target_folder


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
    per file its hard label and soft label, and a staged set's ``stages``), for tools that read image
    folders.

    The folder is written beside ``out_dir`` and renamed into place whole: a non-empty ``out_dir`` is
    refused unless ``overwrite`` (then replaced, never mixed with what was there)."""
    out_dir = target_folder(out_dir, overwrite)
    manifest, samples = raw_samples(path, dataset, method, ipc, version)
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
            target.write_bytes(sample_field(sample, "png"))
            soft = sample_array(sample, "soft.npy").tolist() if "soft.npy" in sample else None
            entry = {"file": relative.as_posix(), "label": label, "soft": soft}
            if "logits.npy" in sample:
                entry["logits"] = sample_array(sample, "logits.npy").tolist()
            entries.append(entry)
        labels = {
            "classes": classes,
            "method": manifest["method"],
            "ipc": manifest["ipc"],
            "source_fingerprint": manifest["source_fingerprint"],
            "images": entries,
        }
        stages = manifest_stages(manifest, len(samples))
        if stages is not None:  # a staged set (PDD): its images per class and step size per stage
            labels["stages"] = stages_json(stages)
        (staging / "labels.json").write_text(json.dumps(labels, indent=2))
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _label(sample: dict[str, Any], classes: list[str]) -> int:
    label = hard_label(sample)
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

    The dataset's description is JSON: method, IPC, source fingerprint (and the stages of a staged
    set, PDD's: images per class and step size per stage, in the order they train). Read it with
    ``datasets.load_from_disk(out)`` (or ``dataset.source: huggingface, dataset.path: out``, which
    finds images and labels by their features); publish it with
    ``datasets.DatasetDict.load_from_disk(out).push_to_hub("user/name")`` (after ``hf auth login``).
    Written beside ``out_dir`` and renamed into place whole, like :func:`write_image_folder`.
    """
    try:
        import datasets as hf
    except ImportError:
        raise CondenseError(HF_MISSING) from None
    out_dir = target_folder(out_dir, overwrite)
    manifest, samples = raw_samples(path, dataset, method, ipc, version)
    classes = [str(c) for c in manifest["classes"]]
    columns: dict[str, list[Any]] = {
        "image": [{"bytes": sample_field(s, "png"), "path": None} for s in samples],
        "label": [_label(s, classes) for s in samples],
    }
    features = {"image": hf.Image(), "label": hf.ClassLabel(names=classes)}
    for column, field in (("soft_label", "soft.npy"), ("logits", "logits.npy")):
        if field in samples[0]:
            columns[column] = [sample_array(s, field).astype(np.float32).reshape(-1) for s in samples]
            features[column] = hf.Sequence(hf.Value("float32"))
    about = {k: manifest.get(k) for k in ("method", "ipc", "source_fingerprint")}
    stages = manifest_stages(manifest, len(samples))
    if stages is not None:
        about["stages"] = stages_json(stages)
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
        replace_folder(staging, out_dir)
    finally:
        if quiet:
            hf.enable_progress_bars()
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
