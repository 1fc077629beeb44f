"""An image folder: ``<root>/train/<class>/<image>`` and ``<root>/test|val/<class>/<image>``, or
Tiny-ImageNet's official layout (``val/val_annotations.txt`` labels ``val/images``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from condense.config import DatasetConfig
from condense.datasets.common import (
    RawDataset,
    Source,
    dataset_root,
    decode_images,
    finish,
    first_per_class,
    hash_file,
    select_classes,
    settings_hash,
)
from condense.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class FolderLayout:
    """The files of an image folder and their labels, in reading order (nothing decoded)."""

    root: Path
    classes: list[str]
    """Class names, index = label: the class folders' names (Tiny-ImageNet: ``words.txt``'s names)."""
    ids: list[str]
    """The class folders' names (wnids for ImageNet and Tiny-ImageNet), index = label."""
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    labelling: list[Path]
    """Files besides the images that decide labels or names (Tiny-ImageNet's annotations, words)."""


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


TINY_ANNOTATIONS = Path("val") / "val_annotations.txt"
"""Tiny-ImageNet's official layout is recognised by its validation labels file."""


def is_tiny_imagenet(root: Path) -> bool:
    """Whether ``root`` has Tiny-ImageNet's official layout: ``train/<wnid>/images/*.JPEG``,
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``, ``wnids.txt``, ``words.txt``."""
    return (root / TINY_ANNOTATIONS).is_file()


def _train_classes(train_dir: Path, wanted: list[str] | None, names: list[str] | None = None) -> list[Path]:
    class_dirs = _class_dirs(train_dir)
    if not class_dirs:
        raise DatasetError(f"no class folders in {train_dir}")
    picks = select_classes([d.name for d in class_dirs], wanted, f"the folder {train_dir}", names)
    return class_dirs if picks is None else [class_dirs[i] for i in picks]


def _train_files(class_dirs: list[Path], images: str | None = None) -> list[tuple[Path, int]]:
    train: list[tuple[Path, int]] = []
    for label, d in enumerate(class_dirs):
        folder = d / images if images and (d / images).is_dir() else d
        files = _image_files(folder)
        if not files:
            raise DatasetError(
                f"class {d.name} has no training images in {folder} ({', '.join(IMAGE_EXTENSIONS)})"
            )
        train += [(p, label) for p in files]
    return train


def _plain_layout(root: Path, wanted: list[str] | None) -> FolderLayout:
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_dir is None:
        raise DatasetError(f"image folder {root} has no test/ or val/ split (expected test/<class>/<image>)")
    class_dirs = _train_classes(train_dir, wanted)
    classes = [d.name for d in class_dirs]
    train = _train_files(class_dirs)
    index = {name: i for i, name in enumerate(classes)}
    by_name = {d.name: d for d in _class_dirs(test_dir)}
    if wanted is None:  # dataset.classes leaves classes out on purpose; else every one must train
        for name, d in by_name.items():
            if name not in index:
                raise DatasetError(
                    f"test class {name!r} ({d}) is not a training class; classes are the folders in "
                    f"{train_dir}"
                )
    test: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):  # in label order, as the training split
        if name in by_name:
            test += [(p, label) for p in _image_files(by_name[name])]
    if not test:
        raise DatasetError(f"no test images in {test_dir} (expected {test_dir.name}/<class>/<image>)")
    return FolderLayout(root, classes, list(classes), train, test, [])


def _words(path: Path) -> dict[str, str]:
    """``words.txt`` (``wnid TAB lemma, lemma, ...``): each wnid's first lemma."""
    words = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, lemmas = line.partition("\t")
        if lemmas.strip():
            words[wnid.strip()] = lemmas.split(",")[0].strip()
    return words


def _readable_names(ids: list[str], words: dict[str, str]) -> list[str]:
    """Each class's first lemma (its wnid when unknown); a lemma shared by two classes gets its wnid."""
    names = [words.get(i) or i for i in ids]
    shared = {n for n in names if names.count(n) > 1}
    return [f"{n} ({i})" if n in shared else n for n, i in zip(names, ids, strict=True)]


def _tiny_layout(root: Path, wanted: list[str] | None) -> FolderLayout:
    """Tiny-ImageNet's official layout: the test split is ``val``, labelled by its annotations."""
    train_dir, annotations = root / "train", root / TINY_ANNOTATIONS
    every = _class_dirs(train_dir)
    labelling = [annotations]
    words: dict[str, str] = {}
    if (root / "words.txt").is_file():
        words = _words(root / "words.txt")
        labelling.append(root / "words.txt")
    if (root / "wnids.txt").is_file():
        listed = set((root / "wnids.txt").read_text(encoding="utf-8").split())
        found = {d.name for d in every}
        if listed != found:
            missing = sorted(listed - found)[:3] or sorted(found - listed)[:3]
            raise DatasetError(
                f"{root / 'wnids.txt'} lists {len(listed)} classes but {train_dir} has {len(found)} class "
                f"folders (differing: {', '.join(missing)}): an incomplete copy?"
            )
    all_names = _readable_names([d.name for d in every], words)
    class_dirs = _train_classes(train_dir, wanted, all_names)
    ids = [d.name for d in class_dirs]
    classes = [all_names[every.index(d)] for d in class_dirs]
    train = _train_files(class_dirs, "images")
    index = {wnid: i for i, wnid in enumerate(ids)}
    known = {d.name for d in every}
    images = root / "val" / "images"
    test: list[tuple[Path, int]] = []
    seen: set[str] = set()
    for number, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(f"{annotations} line {number}: expected 'file TAB wnid ...', got {line!r:.60}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in known:
            raise DatasetError(
                f"{annotations} line {number}: {wnid} is not a training class (a folder in {train_dir})"
            )
        if name in seen:
            raise DatasetError(f"{annotations} line {number}: {name} is labelled twice")
        seen.add(name)
        if wnid not in index:  # left out by dataset.classes
            continue
        path = images / name
        if not path.is_file():
            raise DatasetError(f"{annotations} line {number}: image {path} not found")
        test.append((path, index[wnid]))
    if not test:
        raise DatasetError(f"no test images: {annotations} labels none of the classes")
    return FolderLayout(root, classes, ids, train, test, labelling)


def folder_layout(root: Path, wanted: list[str] | None = None) -> FolderLayout:
    """The image folder at ``root``: Tiny-ImageNet's official layout when it has
    ``val/val_annotations.txt``, else ``train/<class>/*`` and ``test|val/<class>/*``; restricted to
    the classes ``wanted`` (``dataset.classes``) in that order when given."""
    if not (root / "train").is_dir():
        raise DatasetError(f"image folder {root} has no train/ split (expected train/<class>/<image>)")
    return _tiny_layout(root, wanted) if is_tiny_imagenet(root) else _plain_layout(root, wanted)


def load(cfg: DatasetConfig) -> RawDataset:
    layout = folder_layout(dataset_root(cfg), cfg.classes)
    train_y = np.asarray([label for _, label in layout.train], dtype=np.int64)
    keep = first_per_class(train_y, cfg.train_per_class)
    files = [layout.train[i][0] for i in keep] + [p for p, _ in layout.test]
    x = decode_images(files, lambda i: str(files[i]), cfg.resolution, cfg.transform)
    n = len(keep)
    test_y = np.asarray([label for _, label in layout.test], dtype=np.int64)
    return finish(x[:n], train_y[keep], x[n:], test_y, layout.classes)


def fingerprint(cfg: DatasetConfig) -> str:
    """sha256 over (relative path, bytes) of every image file, in reading order (and of the files
    that label them, for Tiny-ImageNet's layout)."""
    h = settings_hash(cfg)
    layout = folder_layout(dataset_root(cfg), cfg.classes)
    for path, _ in layout.train + layout.test:
        hash_file(h, path.relative_to(layout.root).as_posix(), path)
    for path in layout.labelling:
        hash_file(h, path.relative_to(layout.root).as_posix(), path)
    return h.hexdigest()


SOURCE = Source("folder", load, fingerprint)
