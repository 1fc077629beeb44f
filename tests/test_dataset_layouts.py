"""Benchmark dataset shapes on generated data: Tiny-ImageNet's official folder layout, ImageNet class
subsets (MTT's lists), and ``condense data convert`` into WebDataset shards that load back to the
source's images, labels and class names. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from condense import datasets
from condense.config import DatasetConfig, keyed
from condense.datasets import imagenet_subsets
from condense.datasets.common import hash_file
from condense.datasets.write import convert, source_config
from condense.errors import CondenseError, ConfigError, DatasetError
from condense.progress import SILENT
from tests.conftest import memory_and_stream

pytest.importorskip("webdataset")


def _pixels(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def _save(pixels: np.ndarray, path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _decoded(path: Path) -> np.ndarray:
    """An image file as the loaders decode it: RGB, (C, H, W)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def _cli(*args: str):
    from condense_flows.cli import app

    return CliRunner().invoke(app, ["data", *args])


def _same_samples(a: datasets.RawDataset, b: datasets.RawDataset) -> None:
    """The same (image, label) pairs in each split, in any order (a shuffled conversion)."""
    for split in ("train", "test"):
        xa, ya = getattr(a, f"{split}_x"), getattr(a, f"{split}_y")
        xb, yb = getattr(b, f"{split}_x"), getattr(b, f"{split}_y")
        assert xa.shape == xb.shape
        pairs_a = sorted((int(y), x.tobytes()) for x, y in zip(xa, ya, strict=True))
        pairs_b = sorted((int(y), x.tobytes()) for x, y in zip(xb, yb, strict=True))
        assert pairs_a == pairs_b, split


def _identical(a: datasets.RawDataset, b: datasets.RawDataset) -> None:
    for field in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.classes == b.classes


def _shards(path: Path, **settings) -> datasets.RawDataset:
    return datasets.load_source(DatasetConfig(source="webdataset", path=str(path), **settings))


# ------------------------------------------------------------------------------------ Tiny-ImageNet

TINY_CLASSES, TINY_SIDE = 200, 64


def _wnid(i: int) -> str:
    """Distinct fake wnids whose sorted order is not their creation order."""
    return f"n{1000000 + 7919 * i % 1000003:08d}"


def _write_tiny(root: Path, train_per_class: int = 2, val_per_class: int = 1) -> dict:
    """Tiny-ImageNet's official layout: 200 wnid classes of 64 px JPEGs (train/<wnid>/images and
    <wnid>_boxes.txt), val/images labelled by val_annotations.txt in a scrambled class order, an
    unlabelled test/images, wnids.txt (unsorted, as shipped) and words.txt (with decoy synsets, and
    two classes sharing a first lemma)."""
    wnids = [_wnid(i) for i in range(TINY_CLASSES)]
    rng = np.random.default_rng(0)
    words = {w: f"thing {i}, other name {i}" for i, w in enumerate(wnids)}
    words[wnids[1]] = "crane, bird crane"
    words[wnids[2]] = "crane, machine crane"
    lines = [f"{w}\t{names}" for w, names in words.items()] + ["n00000001\tentity", "n09999999\tdecoy, x"]
    (root).mkdir(parents=True)
    (root / "words.txt").write_text("\n".join(sorted(lines)) + "\n")
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    for i, w in enumerate(wnids):
        pixels = _pixels(train_per_class, TINY_SIDE, seed=1000 + i)
        for k in range(train_per_class):
            _save(pixels[k], root / "train" / w / "images" / f"{w}_{k}.JPEG", "JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    # Validation labels do not follow the file names' order: val_0 is not class 0.
    order = np.repeat(np.arange(TINY_CLASSES), val_per_class)
    order = order[rng.permutation(len(order))]
    annotations, val = [], []
    val_pixels = _pixels(len(order), TINY_SIDE, seed=5)
    for n, label in enumerate(order):
        name = f"val_{n}.JPEG"
        _save(val_pixels[n], root / "val" / "images" / name, "JPEG")
        annotations.append(f"{name}\t{wnids[label]}\t0\t1\t60\t62")
        val.append((name, int(label)))
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    _save(_pixels(1, TINY_SIDE, seed=9)[0], root / "test" / "images" / "test_0.JPEG", "JPEG")
    return {"wnids": wnids, "val": val}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    return root, _write_tiny(root)


def test_tiny_imagenet_layout_takes_val_labels_from_the_annotations(tiny):
    root, made = tiny
    raw = datasets.load_source(DatasetConfig(source="folder", path=str(root)))
    ordered = sorted(made["wnids"])  # labels follow the sorted class folders (ImageFolder's order)
    assert raw.train_x.shape == (2 * TINY_CLASSES, 3, TINY_SIDE, TINY_SIDE)
    assert np.bincount(raw.train_y).tolist() == [2] * TINY_CLASSES
    # The test split is val/, each image with its annotated class (never the folder or file order).
    expected = [ordered.index(made["wnids"][label]) for _, label in made["val"]]
    assert raw.test_y.tolist() == expected
    assert expected != sorted(expected)
    for i in (0, 1, 57, len(expected) - 1):
        np.testing.assert_array_equal(raw.test_x[i], _decoded(root / "val" / "images" / made["val"][i][0]))
    first = ordered[0]
    np.testing.assert_array_equal(
        raw.train_x[1], _decoded(root / "train" / first / "images" / f"{first}_1.JPEG")
    )
    # Class names for reports: words.txt's first lemma; a lemma two classes share gets the wnid.
    position = {w: i for i, w in enumerate(made["wnids"])}
    assert raw.classes[5] == f"thing {position[ordered[5]]}"
    assert f"crane ({made['wnids'][1]})" in raw.classes and f"crane ({made['wnids'][2]})" in raw.classes


def test_tiny_imagenet_fingerprint_covers_the_annotations(tiny, tmp_path):
    root, _ = tiny
    copy = tmp_path / "tiny"
    import shutil

    shutil.copytree(root, copy)
    cfg = DatasetConfig(source="folder", path=str(copy))
    first = datasets.source_fingerprint(cfg)
    annotations = copy / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    a, b = lines[0].split("\t"), lines[1].split("\t")
    assert a[1] != b[1]
    a[1], b[1] = b[1], a[1]  # two validation images swap labels: the same files, other data
    annotations.write_text("\n".join(["\t".join(a), "\t".join(b), *lines[2:]]) + "\n")
    assert datasets.source_fingerprint(cfg) != first


def test_tiny_imagenet_incomplete_copy_and_bad_annotations_are_named(tmp_path):
    root = tmp_path / "tiny"
    for w in ("n00000001", "n00000002"):
        _save(_pixels(1, 8, 0)[0], root / "train" / w / "images" / f"{w}_0.JPEG", "JPEG")
    _save(_pixels(1, 8, 1)[0], root / "val" / "images" / "val_0.JPEG", "JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000003\t0\t0\t1\t1\n")
    cfg = DatasetConfig(source="folder", path=str(root))
    with pytest.raises(DatasetError, match="line 1: n00000003 is not a training class"):
        datasets.load_source(cfg)
    (root / "val" / "val_annotations.txt").write_text("val_1.JPEG\tn00000001\nval_0.JPEG\tn00000002\n")
    with pytest.raises(DatasetError, match=r"line 1: image .*val_1.JPEG not found"):
        datasets.load_source(cfg)
    (root / "wnids.txt").write_text("n00000001\nn00000002\nn00000009\n")
    with pytest.raises(DatasetError, match="lists 3 classes but .* has 2 class folders"):
        datasets.load_source(cfg)


# ------------------------------------------------------------------------------ plain image folders


def _write_plain(root: Path, classes: list[str], train: int = 2, test: int = 1, side: int = 8) -> None:
    for c, name in enumerate(classes):
        for split, n in (("train", train), ("val", test)):
            pixels = _pixels(n, side, seed=100 * c + (split == "val"))
            for k in range(n):
                _save(pixels[k], root / split / name / f"{k:03d}.png")


def test_plain_folder_fingerprint_and_keys_are_as_before(tmp_path):
    """An existing folder config: the same fingerprint as before the Tiny layout and class subsets
    (recomputed here from the recorded formula), and no new field in its stage key."""
    _write_plain(tmp_path, ["cat", "dog", "emu"])
    cfg = DatasetConfig(source="folder", path=str(tmp_path))
    settings = {"format": 1, "source": "folder", "resolution": None, "train_per_class": None}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + b"\0")
    for split in ("train", "val"):
        for path in sorted((tmp_path / split).glob("*/*.png")):
            hash_file(h, path.relative_to(tmp_path).as_posix(), path)
    assert datasets.source_fingerprint(cfg) == h.hexdigest()
    assert "classes" not in keyed(cfg) and "classes" in keyed(cfg.model_copy(update={"classes": ["dog"]}))
    assert datasets.source_fingerprint(cfg.model_copy(update={"classes": ["dog", "cat"]})) != h.hexdigest()


# ----------------------------------------------------------------------------------- ImageNet subsets

# fast.ai's ImageNette classes; its last folder, n03888605, is "parallel bars" in ImageNet-1K: MTT's
# index 701 is ImageNet's parachute, n03888257 (see condense.datasets.imagenet_subsets).
IMAGENETTE = [
    ("n01440764", "tench"),
    ("n02102040", "English springer"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw"),
    ("n03028079", "church"),
    ("n03394916", "French horn"),
    ("n03417042", "garbage truck"),
    ("n03425413", "gas pump"),
    ("n03445777", "golf ball"),
    ("n03888257", "parachute"),
]


def test_mtt_subsets_are_its_imagenet_indices_as_wnids():
    assert imagenet_subsets.subset_indices("imagenette") == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert imagenet_subsets.subset_classes("imagenette") == [w for w, _ in IMAGENETTE]
    assert [imagenet_subsets.class_label(w) for w, _ in IMAGENETTE] == [n for _, n in IMAGENETTE]
    assert imagenet_subsets.subset_indices("imagewoof") == [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
    assert imagenet_subsets.subset_indices("imagesquawk") == [84, 130, 88, 144, 145, 22, 96, 9, 100, 89]
    assert imagenet_subsets.subset_indices("imagefruit") == [953, 954, 949, 950, 951, 957, 952, 945, 943, 948]
    assert imagenet_subsets.subset_indices("imagemeow") == [281, 282, 283, 284, 285, 291, 292, 290, 289, 287]
    assert imagenet_subsets.subset_indices("imageyellow") == [309, 986, 954, 951, 987, 779, 599, 291, 72, 11]
    assert imagenet_subsets.subset_labels("imagemeow")[:2] == ["tabby", "tiger cat"]
    with pytest.raises(ConfigError, match="did you mean imagenette"):
        imagenet_subsets.subset_classes("imagenet")


def test_mtt_subsets_match_timms_imagenet_tables():
    """Every (index, wnid, lemma) written out agrees with timm's sorted ImageNet-1K synsets and lemmas."""
    timm = pytest.importorskip("timm")
    info = Path(timm.__file__).parent / "data" / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    assert synsets == sorted(synsets) and len(synsets) == 1000
    lemmas = dict(
        line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    for name in imagenet_subsets.SUBSETS:
        indices = imagenet_subsets.subset_indices(name)
        assert imagenet_subsets.subset_classes(name) == [synsets[i] for i in indices], name
        assert imagenet_subsets.subset_labels(name) == [lemmas[synsets[i]].split(",")[0] for i in indices]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An ImageNet-style folder of wnid classes (ImageWoof's ten and five others), 8 px PNGs."""
    root = tmp_path_factory.mktemp("imagenet") / "imagenet"
    wnids = sorted(imagenet_subsets.subset_classes("imagewoof") + ["n01440764", "n09999991", "n02000001"])
    _write_plain(root, wnids)
    return root, wnids


def test_an_imagenet_subset_is_relabelled_in_its_own_order(imagenet_folder):
    root, wnids = imagenet_folder
    woof = imagenet_subsets.subset_classes("imagewoof")
    assert woof != sorted(woof)
    raw = datasets.load_source(DatasetConfig(source="folder", path=str(root), classes="imagewoof"))
    assert raw.classes == woof
    assert raw.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    assert raw.test_y.tolist() == list(range(10))
    for label, wnid in enumerate(woof):  # label i holds the images of the subset's i-th wnid
        np.testing.assert_array_equal(raw.train_x[2 * label + 1], _decoded(root / "train" / wnid / "001.png"))
        np.testing.assert_array_equal(raw.test_x[label], _decoded(root / "val" / wnid / "000.png"))
    picked = datasets.load_source(
        DatasetConfig(source="folder", path=str(root), classes=[wnids[3], wnids[0]])
    )
    assert picked.classes == [wnids[3], wnids[0]] and picked.test_y.tolist() == [0, 1]
    with pytest.raises(DatasetError, match="'n0144076' is not a class .*did you mean n01440764"):
        datasets.load_source(DatasetConfig(source="folder", path=str(root), classes=["n0144076"]))


def test_a_subset_of_converted_imagenet_shards_is_the_folders_subset(imagenet_folder, tmp_path):
    root, wnids = imagenet_folder
    convert(source_config(str(root)), tmp_path / "wds", shard_size=7, progress=SILENT)
    assert (tmp_path / "wds" / "classes.txt").read_text().split() == wnids
    from_folder = datasets.load_source(DatasetConfig(source="folder", path=str(root), classes="imagewoof"))
    from_shards = _shards(tmp_path / "wds", classes="imagewoof")
    assert from_shards.classes == from_folder.classes
    _same_samples(from_shards, from_folder)
    # Taking the subset while converting gives the same data, its classes listed in its order.
    convert(source_config(str(root), classes=from_folder.classes), tmp_path / "woof", progress=SILENT)
    assert (tmp_path / "woof" / "classes.txt").read_text().split() == from_folder.classes
    _same_samples(_shards(tmp_path / "woof"), from_folder)


def test_streamed_shards_name_and_subset_classes_from_their_class_list(imagenet_folder, tmp_path):
    root, wnids = imagenet_folder
    convert(source_config(str(root)), tmp_path / "wds", shard_size=9, progress=SILENT)
    picked = [wnids[4], wnids[1], wnids[2]]
    memory, stream = memory_and_stream(tmp_path / "wds", tmp_path / "store", classes=picked)
    assert memory.card["classes"] == stream.card["classes"] == picked
    assert torch.equal(memory.train_y, stream.train_y) and torch.equal(memory.test_y, stream.test_y)
    assert sorted(memory.train_y.tolist()) == [0, 0, 1, 1, 2, 2]
    whole, _ = memory_and_stream(tmp_path / "wds", tmp_path / "whole")
    assert whole.card["classes"] == wnids


# ------------------------------------------------------------------------------------------ convert


def _write_cifar100(root: Path, per_class: int = 3, test_per_class: int = 1) -> list[str]:
    """torchvision's CIFAR-100 files (cifar-100-python/{train,test,meta}), 100 classes of 32 px."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class_{i:02d}" for i in range(100)]
    rng = np.random.default_rng(3)
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)[rng.permutation(100 * n)]
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        entry = {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": []}))
    return names


@pytest.fixture
def cifar100(tmp_path, monkeypatch) -> Path:
    """torchvision.datasets.CIFAR100 reading generated files (no checksums, so nothing downloads)."""
    tv = pytest.importorskip("torchvision.datasets")

    class GeneratedCIFAR100(tv.CIFAR100):
        train_list = [["train", None]]
        test_list = [["test", None]]
        meta = {"filename": "meta", "key": "fine_label_names", "md5": None}

    monkeypatch.setattr(tv, "CIFAR100", GeneratedCIFAR100)
    root = tmp_path / "torchvision"
    _write_cifar100(root)
    return root


def test_convert_cifar100_from_torchvision_round_trips(cifar100, tmp_path):
    out = tmp_path / "cifar100-wds"
    result = _cli(
        "convert", "torchvision:CIFAR100", "--root", str(cifar100), "--to", str(out), "--shard-size", "64"
    )
    assert result.exit_code == 0, result.output
    assert "train 300 images in 5 shards, test 100 images in 2 shards, 100 classes" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.txt",
        *(f"test-{i:06d}.tar" for i in range(2)),
        *(f"train-{i:06d}.tar" for i in range(5)),
    ]
    source = datasets.load_source(DatasetConfig(source="torchvision", name="CIFAR100", path=str(cifar100)))
    shards = _shards(out)
    assert shards.classes == source.classes == [f"class_{i:02d}" for i in range(100)]
    assert shards.train_x.shape == (300, 3, 32, 32)
    _same_samples(shards, source)
    # Shuffled training shards (streaming mixes a shard buffer, not the whole split); test kept in order.
    assert shards.train_y.tolist() != source.train_y.tolist()
    np.testing.assert_array_equal(shards.test_x, source.test_x)
    with tarfile.open(out / "train-000000.tar") as tar:  # uncompressed, PNG + cls per sample
        names = tar.getnames()
    assert names[:2] == ["00000000.png", "00000000.cls"] and len(names) == 128


def test_convert_torchvision_without_the_files_says_to_download(tmp_path, cifar100):
    result = _cli(
        "convert", "torchvision:CIFAR100", "--root", str(tmp_path / "empty"), "--to", str(tmp_path / "o")
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pass --download" in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_convert_tiny_imagenet_keeps_its_jpeg_bytes_and_labels(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "tiny-wds"
    done = convert(source_config(str(root)), out, shard_size=150, keep_order=True, progress=SILENT)
    assert done.counts == {"train": 400, "test": 200} and done.shards == {"train": 3, "test": 2}
    source = datasets.load_source(DatasetConfig(source="folder", path=str(root)))
    _identical(_shards(out), source)  # the same order, the same JPEG bytes: the same pixels
    with tarfile.open(out / "train-000000.tar") as tar:
        first = tar.extractfile("00000000.jpg").read()
    wnid = sorted(_wnid(i) for i in range(TINY_CLASSES))[0]
    assert first == (root / "train" / wnid / "images" / f"{wnid}_0.JPEG").read_bytes()


def test_convert_plain_folder_round_trips_and_shards_by_size(tmp_path):
    root = tmp_path / "flowers"
    _write_plain(root, ["daisy", "rose", "tulip"], train=4, test=2, side=16)
    source = datasets.load_source(DatasetConfig(source="folder", path=str(root)))
    done = convert(source_config(str(root)), tmp_path / "a", shard_mb=0.002, progress=SILENT)
    assert done.shards["train"] > 2  # about two 16 px PNGs a shard
    _same_samples(_shards(tmp_path / "a"), source)
    assert _shards(tmp_path / "a").classes == ["daisy", "rose", "tulip"]
    convert(source_config(str(root)), tmp_path / "b", keep_order=True, progress=SILENT)
    _identical(_shards(tmp_path / "b"), source)
    # Shards convert again (here to the class subset), as do their own conversions.
    convert(source_config(str(tmp_path / "b"), classes=["tulip", "daisy"]), tmp_path / "c", progress=SILENT)
    sub = _shards(tmp_path / "c")
    assert sub.classes == ["tulip", "daisy"] and np.bincount(sub.train_y).tolist() == [4, 4]
    tulips = np.flatnonzero(source.train_y == 2)
    _same_samples(
        sub,
        datasets.RawDataset(
            np.concatenate([source.train_x[tulips], source.train_x[source.train_y == 0]]),
            np.repeat([0, 1], 4),
            np.concatenate([source.test_x[source.test_y == 2], source.test_x[source.test_y == 0]]),
            np.repeat([0, 1], 2),
            ["tulip", "daisy"],
        ),
    )


def test_convert_huggingface_folder_round_trips(tmp_path):
    hf = pytest.importorskip("datasets")
    names = ["ant", "bee", "cat"]
    features = hf.Features({"img": hf.Image(), "label": hf.ClassLabel(names=names)})

    def split(n: int) -> object:
        images = [Image.fromarray(p) for p in _pixels(n, 8, seed=n)]
        labels = [(i * 2) % 3 for i in range(n)]
        return hf.Dataset.from_dict({"img": images, "label": labels}, features=features)

    hf.DatasetDict({"train": split(12), "test": split(6)}).save_to_disk(str(tmp_path / "hfdata"))
    source = datasets.load_source(DatasetConfig(source="huggingface", path=str(tmp_path / "hfdata")))
    convert(source_config(str(tmp_path / "hfdata")), tmp_path / "wds", keep_order=True, progress=SILENT)
    _identical(_shards(tmp_path / "wds"), source)


def test_convert_refuses_to_overwrite_and_replaces_whole_with_overwrite(tmp_path):
    root = tmp_path / "src"
    _write_plain(root, ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli("convert", str(root), "--to", str(out))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: --to {out} is not empty; pass --overwrite to replace it"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = _cli("convert", str(root), "--to", str(out), "--overwrite", "--keep-order")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "test-000000.tar", "train-000000.tar"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    with pytest.raises(CondenseError, match="overlap"):
        convert(source_config(str(root)), root / "shards", progress=SILENT)


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("{tmp}/nowhere", "SRC {tmp}/nowhere not found: a folder"),
        ("{tmp}/empty", "SRC {tmp}/empty is neither an image folder"),
        ("torchvision:", "torchvision:NAME needs a torchvision.datasets class"),
        ("torchvision:CIFAR1000", "unknown torchvision dataset 'CIFAR1000' (did you mean CIFAR100"),
    ],
)
def test_a_bad_source_is_one_line(tmp_path, src, message):
    (tmp_path / "empty").mkdir()
    result = _cli("convert", src.format(tmp=tmp_path), "--to", str(tmp_path / "out"))
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(tmp=tmp_path)), result.output
    assert not (tmp_path / "out").exists()


def test_a_bad_subset_or_class_is_one_line(imagenet_folder, tmp_path):
    root, _ = imagenet_folder
    result = _cli("convert", str(root), "--to", str(tmp_path / "o"), "--subset", "imagewolf")
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "error: unknown ImageNet subset 'imagewolf' (did you mean imagewoof?); known: imagenette, imagewoof, "
        "imagefruit, imageyellow, imagemeow, imagesquawk"
    ]
    result = _cli("convert", str(root), "--to", str(tmp_path / "o"), "--classes", "n01440764,zebra")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "'zebra' is not a class of the folder" in result.output


def test_shards_without_a_class_list_cannot_take_a_subset(tmp_path):
    root = tmp_path / "src"
    _write_plain(root, ["a", "b"])
    convert(source_config(str(root)), tmp_path / "wds", progress=SILENT)
    (tmp_path / "wds" / "classes.txt").unlink()
    assert _shards(tmp_path / "wds").classes == ["0", "1"]
    with pytest.raises(DatasetError, match="no classes.txt"):
        _shards(tmp_path / "wds", classes=["a"])
    assert _shards(tmp_path / "wds", class_names=["x", "y"], classes=["y"]).classes == ["y"]


def test_a_class_list_with_a_gap_is_refused(tmp_path):
    root = tmp_path / "src"
    _write_plain(root, ["a", "b"])
    convert(source_config(str(root)), tmp_path / "wds", progress=SILENT)
    (tmp_path / "wds" / "classes.txt").write_text("a\n\nb\n")
    with pytest.raises(DatasetError, match="has an empty line"):
        _shards(tmp_path / "wds")
    (tmp_path / "wds" / "classes.txt").write_text("a\n")
    with pytest.raises(DatasetError, match="has cls 1, but .*classes.txt names 1 classes"):
        _shards(tmp_path / "wds")


def test_classes_accepts_a_subset_name_and_refuses_repeats():
    cfg = DatasetConfig(source="folder", path="/data/imagenet", classes="imagenette")
    assert cfg.classes == [w for w, _ in IMAGENETTE]
    with pytest.raises(ValueError, match="distinct"):
        DatasetConfig(source="folder", path="/data/imagenet", classes=["a", "a"])
    with pytest.raises(ValueError, match="unknown ImageNet subset"):
        DatasetConfig(source="folder", path="/data/imagenet", classes="imagewolf")


def test_data_convert_help_follows_the_cli_conventions_and_imports_nothing_heavy():
    from condense_flows.cli import app

    page = CliRunner().invoke(app, ["data", "convert", "--help"], env={"COLUMNS": "100"}).output
    options = page.split("Options:")[1]
    assert "--shard-size N" in options and "--subset NAME" in options and "  --overwrite  " in options
    assert "<str>" not in options and "<int>" not in options and "--no-" not in page
    assert max(len(line) for line in page.splitlines()) <= 100
    script = (
        "import sys\nfrom typer.testing import CliRunner\nimport condense_flows.cli as cli\n"
        "code = CliRunner().invoke(cli.app, ['data', 'convert', '--help']).exit_code\n"
        "print(code, sorted({'torch', 'prefect'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []"


def test_convert_reads_gzip_shards_too(tmp_path):
    import gzip

    root = tmp_path / "src"
    _write_plain(root, ["a", "b", "c"], train=3)
    source = datasets.load_source(DatasetConfig(source="folder", path=str(root)))
    convert(source_config(str(root)), tmp_path / "wds", shard_size=4, keep_order=True, progress=SILENT)
    for shard in (tmp_path / "wds").glob("*.tar"):
        shard.with_name(shard.name + ".gz").write_bytes(gzip.compress(shard.read_bytes()))
        shard.unlink()
    out = tmp_path / "again"
    convert(source_config(str(tmp_path / "wds"), classes=["c", "a"]), out, keep_order=True, progress=SILENT)
    assert sorted(p.suffix for p in out.glob("*-*")) == [".tar"] * 2
    again = _shards(out)
    assert again.classes == ["c", "a"] and again.train_y.tolist() == [1, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(again.train_x[:3], source.train_x[source.train_y == 0])
    np.testing.assert_array_equal(again.train_x[3:], source.train_x[source.train_y == 2])
