"""condense.datasets on tiny data built in tmp_path: WebDataset shards, an image folder, digits and a
fake torchvision dataset. No network, nothing outside tmp_path."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from condense import datasets
from condense.config import DatasetConfig
from condense.errors import DatasetError

wds = pytest.importorskip("webdataset")

# Labels in reading order; deliberately not interleaved regularly, so "first N per class" differs
# from "first N*K samples".
TRAIN_LABELS = [0, 1, 0, 0, 2, 0, 1, 2, 1, 2, 1, 2]
TEST_LABELS = [2, 0, 1, 1, 0, 2]
SIDE = 8


def _images(n: int, seed: int, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path, images: np.ndarray, labels: list[int], start: int = 0, drop: str = "") -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            sample = {"__key__": f"{start + i:06d}", "png": _png(img), "cls": str(label).encode()}
            sample.pop(drop, None)
            sink.write(sample)


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train: 12 images in a .tar and a .tar.gz shard; test: 6 images in one .tar shard."""
    root = tmp_path / "shards"
    root.mkdir()
    train, test = _images(12, seed=0), _images(6, seed=1)
    _write_shard(root / "train-000000.tar", train[:6], TRAIN_LABELS[:6])
    _write_shard(root / "train-000001.tar.gz", train[6:], TRAIN_LABELS[6:], start=6)
    _write_shard(root / "test-000000.tar", test, TEST_LABELS, start=100)
    (root / "README.md").write_text("not a shard")
    return root, train, test


def _wds_cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(source="webdataset", name="tiny", path=str(root), **kw)


def _chw(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------- webdataset


def test_webdataset_round_trip(shards):
    root, train, test = shards
    raw = datasets.load_source(_wds_cfg(root))
    assert raw.train_x.dtype == np.uint8 and raw.test_x.dtype == np.uint8
    assert raw.train_y.dtype == np.int64 and raw.test_y.dtype == np.int64
    assert raw.train_x.shape == (12, 3, SIDE, SIDE) and raw.test_x.shape == (6, 3, SIDE, SIDE)
    np.testing.assert_array_equal(raw.train_x, _chw(train))  # PNG is lossless: exact pixels back
    np.testing.assert_array_equal(raw.test_x, _chw(test))
    assert raw.train_y.tolist() == TRAIN_LABELS and raw.test_y.tolist() == TEST_LABELS
    assert raw.classes == ["0", "1", "2"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        raw.classes = []  # type: ignore[misc]


def test_webdataset_val_shards_are_the_test_split(shards):
    root, _, test = shards
    (root / "test-000000.tar").rename(root / "val-000000.tar")
    raw = datasets.load_source(_wds_cfg(root))
    np.testing.assert_array_equal(raw.test_x, _chw(test))


def test_webdataset_train_per_class_keeps_first_in_order(shards):
    root, train, _ = shards
    raw = datasets.load_source(_wds_cfg(root, train_per_class=2))
    keep = [0, 1, 2, 4, 6, 7]  # the first two 0s, 1s and 2s of TRAIN_LABELS, in reading order
    assert raw.train_y.tolist() == [TRAIN_LABELS[i] for i in keep]
    np.testing.assert_array_equal(raw.train_x, _chw(train[keep]))
    assert len(raw.test_y) == 6  # the test split is never subsampled


def test_webdataset_resolution_is_pil_bilinear(shards):
    root, train, _ = shards
    raw = datasets.load_source(_wds_cfg(root, resolution=4))
    assert raw.train_x.shape == (12, 3, 4, 4) and raw.test_x.shape == (6, 3, 4, 4)
    expected = np.asarray(Image.fromarray(train[3]).resize((4, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(raw.train_x[3], expected.transpose(2, 0, 1))


def test_webdataset_urls_match_directory(shards):
    root, _, _ = shards
    cfg = DatasetConfig(
        source="webdataset",
        train_urls=f"{root}/train-000000.tar::{root}/train-000001.tar.gz",
        test_urls=f"{root}/test-{{000000..000000}}.tar",
    )
    from_urls, from_dir = datasets.load_source(cfg), datasets.load_source(_wds_cfg(root))
    assert datasets.content_fingerprint(from_urls) == datasets.content_fingerprint(from_dir)
    assert datasets.source_fingerprint(cfg) is not None  # local files can be hashed
    remote = cfg.model_copy(update={"train_urls": "https://example.invalid/train-{000000..000003}.tar"})
    assert datasets.source_fingerprint(remote) is None  # only decoding could tell


def test_source_fingerprint_tracks_bytes_and_settings(shards):
    root, train, _ = shards
    cfg = _wds_cfg(root)
    first = datasets.source_fingerprint(cfg)
    assert first is not None and len(first) == 64
    assert datasets.source_fingerprint(cfg) == first
    assert datasets.source_fingerprint(_wds_cfg(root, resolution=4)) != first
    assert datasets.source_fingerprint(_wds_cfg(root, train_per_class=2)) != first
    (root / "README.md").write_text("edited")  # not a shard: no effect
    assert datasets.source_fingerprint(cfg) == first
    changed = train[6:].copy()
    changed[0, 0, 0, 0] ^= 1
    _write_shard(root / "train-000001.tar.gz", changed, TRAIN_LABELS[6:], start=6)
    assert datasets.source_fingerprint(cfg) != first


def test_content_fingerprint_tracks_arrays(shards):
    root, train, _ = shards
    raw = datasets.load_source(_wds_cfg(root))
    fp = datasets.content_fingerprint(raw)
    assert fp == datasets.content_fingerprint(datasets.load_source(_wds_cfg(root)))
    assert fp != datasets.content_fingerprint(datasets.load_source(_wds_cfg(root, resolution=4)))
    flipped = raw.train_x.copy()
    flipped[0, 0, 0, 0] ^= 1
    assert fp != datasets.content_fingerprint(dataclasses.replace(raw, train_x=flipped))
    assert fp != datasets.content_fingerprint(dataclasses.replace(raw, classes=["a", "b", "c"]))


@pytest.mark.parametrize("name", ["train-000001.tar.gz", "train-000000.tar"])
def test_corrupt_shard_is_named(shards, name):
    root, _, _ = shards
    (root / name).write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=f"corrupt or unreadable shard .*{name}"):
        datasets.load_source(_wds_cfg(root))


def test_truncated_gzip_shard_is_named(shards):
    root, _, _ = shards
    path = root / "train-000001.tar.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="train-000001.tar.gz"):
        datasets.load_source(_wds_cfg(root))


def test_empty_split_is_an_error(shards):
    root, _, _ = shards
    with wds.TarWriter(str(root / "test-000000.tar")):
        pass  # a valid tar with no members
    with pytest.raises(DatasetError, match="no samples in shards .*test-000000.tar"):
        datasets.load_source(_wds_cfg(root))


def test_missing_path_and_missing_shards(tmp_path, shards):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="dataset path not found"):
        datasets.load_source(_wds_cfg(missing))
    with pytest.raises(DatasetError, match="dataset path not found"):
        datasets.source_fingerprint(_wds_cfg(missing))
    root, _, _ = shards
    for p in root.glob("test-*"):
        p.unlink()
    with pytest.raises(DatasetError, match="no test shards"):
        datasets.load_source(_wds_cfg(root))
    cfg = DatasetConfig(
        source="webdataset", train_urls=str(root / "train-00000{0..1}.tar"), test_urls="x.tar"
    )
    with pytest.raises(DatasetError, match="shard not found: .*train-000001.tar"):
        datasets.load_source(cfg)


def test_failing_pipe_shard_reports_exit_status(shards):
    root, _, _ = shards
    cfg = DatasetConfig(
        source="webdataset", train_urls="pipe:exit 3", test_urls=str(root / "test-000000.tar")
    )
    assert datasets.source_fingerprint(cfg) is None
    with pytest.raises(DatasetError, match="unreadable shard pipe:exit 3: command exited with status 3"):
        datasets.load_source(cfg)


@pytest.mark.parametrize(("drop", "message"), [("cls", "has no 'cls' key"), ("png", "has no image")])
def test_sample_missing_key(shards, drop, message):
    root, train, _ = shards
    _write_shard(root / "train-000001.tar.gz", train[6:], TRAIN_LABELS[6:], start=6, drop=drop)
    with pytest.raises(DatasetError, match=f"sample 000006 in .*train-000001.tar.gz {message}"):
        datasets.load_source(_wds_cfg(root))


def test_class_without_training_images(shards):
    root, train, _ = shards
    labels = [0 if y == 1 else y for y in TRAIN_LABELS]  # class 1 only in the test split now
    _write_shard(root / "train-000000.tar", train[:6], labels[:6])
    _write_shard(root / "train-000001.tar.gz", train[6:], labels[6:], start=6)
    with pytest.raises(DatasetError, match="class 1 has no training images"):
        datasets.load_source(_wds_cfg(root))


def test_class_names_name_the_indices_and_must_cover_them(shards):
    root, _, _ = shards
    raw = datasets.load_source(_wds_cfg(root, class_names=["cat", "dog", "frog"]))
    assert raw.classes == ["cat", "dog", "frog"] and raw.train_y.tolist() == TRAIN_LABELS
    with pytest.raises(DatasetError, match="has cls 2, but dataset.class_names names 2 classes"):
        datasets.load_source(_wds_cfg(root, class_names=["cat", "dog"]))
    # A named class the shards never use has no training images.
    with pytest.raises(DatasetError, match="class bird has no training images"):
        datasets.load_source(_wds_cfg(root, class_names=["cat", "dog", "frog", "bird"]))
    with pytest.raises(ValueError, match="distinct"):
        _wds_cfg(root, class_names=["cat", "cat", "frog"])
    with pytest.raises(ValueError, match="names its classes itself"):
        DatasetConfig(source="digits", class_names=[str(i) for i in range(10)])


def test_mixed_sizes_need_resolution(shards):
    root, _, _ = shards
    _write_shard(root / "test-000000.tar", _images(6, seed=5, side=10), TEST_LABELS)
    with pytest.raises(DatasetError, match="set dataset.resolution"):
        datasets.load_source(_wds_cfg(root))
    raw = datasets.load_source(_wds_cfg(root, resolution=6))
    assert raw.train_x.shape[1:] == raw.test_x.shape[1:] == (3, 6, 6)


# -------------------------------------------------------------------------------------------- folder


def _write_folder(root: Path, test_name: str = "test", gray: bool = False) -> dict[str, np.ndarray]:
    """train/{cat,dog,emu}/ with 3/2/2 images, <test_name>/{cat,dog,emu}/ with 1/1/2; returns the pixels."""
    pixels = {}
    layout = {"train": {"cat": 3, "dog": 2, "emu": 2}, test_name: {"cat": 1, "dog": 1, "emu": 2}}
    seed = 10
    for split, counts in layout.items():
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, img in enumerate(_images(n, seed=seed)):
                seed += 1
                if gray:
                    img = img[..., 0]
                Image.fromarray(img).save(folder / f"{i:03d}.png")
                pixels[f"{split}/{cls}/{i:03d}"] = img
            (folder / "notes.txt").write_text("ignored")
    return pixels


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_folder_round_trip(tmp_path, test_name):
    pixels = _write_folder(tmp_path, test_name)
    raw = datasets.load_source(DatasetConfig(source="folder", path=str(tmp_path)))
    assert raw.classes == ["cat", "dog", "emu"]
    assert raw.train_y.tolist() == [0, 0, 0, 1, 1, 2, 2] and raw.test_y.tolist() == [0, 1, 2, 2]
    assert raw.train_x.shape == (7, 3, SIDE, SIDE) and raw.train_x.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_x[3], pixels["train/dog/000"].transpose(2, 0, 1))
    np.testing.assert_array_equal(raw.test_x[3], pixels[f"{test_name}/emu/001"].transpose(2, 0, 1))


def test_folder_grayscale_and_mixed(tmp_path):
    pixels = _write_folder(tmp_path, gray=True)
    cfg = DatasetConfig(source="folder", path=str(tmp_path))
    raw = datasets.load_source(cfg)
    assert raw.train_x.shape == (7, 1, SIDE, SIDE)
    np.testing.assert_array_equal(raw.train_x[0, 0], pixels["train/cat/000"])
    Image.fromarray(_images(1, seed=99)[0]).save(tmp_path / "test" / "cat" / "rgb.png")
    mixed = datasets.load_source(cfg)
    assert mixed.train_x.shape == (7, 3, SIDE, SIDE)  # one RGB image turns everything RGB
    np.testing.assert_array_equal(mixed.train_x[0], np.stack([pixels["train/cat/000"]] * 3))


def test_folder_train_per_class_and_resolution(tmp_path):
    pixels = _write_folder(tmp_path)
    raw = datasets.load_source(
        DatasetConfig(source="folder", path=str(tmp_path), train_per_class=1, resolution=5)
    )
    assert raw.train_y.tolist() == [0, 1, 2] and raw.train_x.shape == (3, 3, 5, 5)
    expected = np.asarray(Image.fromarray(pixels["train/dog/000"]).resize((5, 5), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(raw.train_x[1], expected.transpose(2, 0, 1))


def test_folder_fingerprint(tmp_path):
    _write_folder(tmp_path)
    cfg = DatasetConfig(source="folder", path=str(tmp_path))
    first = datasets.source_fingerprint(cfg)
    assert first == datasets.source_fingerprint(cfg)
    (tmp_path / "train" / "cat" / "more-notes.txt").write_text("ignored")
    assert datasets.source_fingerprint(cfg) == first
    assert datasets.source_fingerprint(cfg.model_copy(update={"resolution": 4})) != first
    Image.fromarray(_images(1, seed=123)[0]).save(tmp_path / "train" / "dog" / "001.png")
    assert datasets.source_fingerprint(cfg) != first


def test_folder_errors(tmp_path):
    cfg = DatasetConfig(source="folder", path=str(tmp_path))
    with pytest.raises(DatasetError, match="has no train/ split"):
        datasets.load_source(cfg)
    _write_folder(tmp_path)
    (tmp_path / "test" / "yak").mkdir()
    with pytest.raises(DatasetError, match="test class 'yak'"):
        datasets.load_source(cfg)
    (tmp_path / "test" / "yak").rmdir()
    (tmp_path / "train" / "yak").mkdir()
    with pytest.raises(DatasetError, match="class yak has no training images"):
        datasets.load_source(cfg)
    (tmp_path / "train" / "yak" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode image .*bad.png"):
        datasets.load_source(cfg)


# -------------------------------------------------------------------------------------------- digits


def test_digits():
    cfg = DatasetConfig(source="digits")
    raw = datasets.load_source(cfg)
    assert raw.train_x.shape == (1437, 1, 8, 8) and raw.test_x.shape == (360, 1, 8, 8)
    assert raw.train_x.dtype == np.uint8 and raw.train_y.dtype == np.int64
    assert raw.classes == [str(i) for i in range(10)]
    assert raw.train_x.max() == 255
    assert set(np.unique(raw.train_x)) <= {round(v * 255 / 16) for v in range(17)}
    assert np.bincount(raw.test_y).min() >= 35  # stratified: ~36 test images per class
    assert datasets.content_fingerprint(raw) == datasets.content_fingerprint(datasets.load_source(cfg))
    fp = datasets.source_fingerprint(cfg)
    assert fp == datasets.source_fingerprint(cfg)
    assert fp != datasets.source_fingerprint(DatasetConfig(source="digits", resolution=16))
    small = datasets.load_source(DatasetConfig(source="digits", train_per_class=5, resolution=16))
    assert small.train_x.shape == (50, 1, 16, 16) and np.bincount(small.train_y).tolist() == [5] * 10
    np.testing.assert_array_equal(small.test_y, raw.test_y)


# --------------------------------------------------------------------------------------- torchvision


class _FakeVision:
    """Stands in for e.g. torchvision.datasets.CIFAR10: HWC uint8 ``.data``, list ``.targets``."""

    calls: list[tuple[str, bool, bool]] = []

    def __init__(self, root: str, train: bool, download: bool) -> None:
        type(self).calls.append((root, train, download))
        n = 9 if train else 3
        self.pixels = self.data = _images(n, seed=int(train))
        self.targets = [i % 3 for i in range(n)]
        self.classes = ["plane", "car", "bird"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.pixels[i]), self.targets[i]


class _FakeVisionNoArrays(_FakeVision):
    """Only __getitem__ works (like ImageFolder-style datasets): the loader must iterate."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        super().__init__(root, train, download)
        self.data = None


@pytest.mark.parametrize("fake", [_FakeVision, _FakeVisionNoArrays])
def test_torchvision_fake(tmp_path, monkeypatch, fake):
    tv_datasets = pytest.importorskip("torchvision.datasets")
    monkeypatch.setattr(tv_datasets, "TinyFake", fake, raising=False)
    monkeypatch.setattr(_FakeVision, "calls", [])
    cfg = DatasetConfig(source="torchvision", name="TinyFake", path=str(tmp_path), train_per_class=2)
    raw = datasets.load_source(cfg)
    assert _FakeVision.calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert raw.classes == ["plane", "car", "bird"]
    assert raw.train_y.tolist() == [0, 1, 2, 0, 1, 2] and raw.test_y.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(raw.train_x, _chw(_images(9, seed=1)[:6]))
    np.testing.assert_array_equal(raw.test_x, _chw(_images(3, seed=0)))
    assert datasets.source_fingerprint(cfg) is None
    resized = datasets.load_source(cfg.model_copy(update={"resolution": 4}))
    assert resized.train_x.shape == (6, 3, 4, 4)


def test_torchvision_unknown_name_and_missing_package(monkeypatch):
    pytest.importorskip("torchvision.datasets")
    with pytest.raises(DatasetError, match="unknown torchvision dataset 'CIFAR11'.*did you mean CIFAR10"):
        datasets.load_source(DatasetConfig(source="torchvision", name="CIFAR11"))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetError, match="needs torchvision: pip install torchvision"):
        datasets.load_source(DatasetConfig(source="torchvision", name="CIFAR10"))


# ---------------------------------------------------------------------------------------- labels


def test_a_label_far_past_the_samples_names_its_sample_instead_of_allocating(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _write_shard(root / "train-000000.tar", _images(3, seed=0), [0, 10**12, 1])
    _write_shard(root / "test-000000.tar", _images(2, seed=1), [0, 1])
    with pytest.raises(DatasetError, match=r"sample 000001 in .*train-000000.tar has cls 1000000000000"):
        datasets.load_source(_wds_cfg(root))


def test_a_test_label_outside_the_training_classes_names_that_sample(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _write_shard(root / "train-000000.tar", _images(4, seed=0), [0, 1, 0, 1])
    _write_shard(root / "test-000000.tar", _images(3, seed=1), [0, 1, 7], start=50)
    with pytest.raises(
        DatasetError,
        match=r"test sample 000052 .* has cls 7, but no training sample does \(training classes 0\.\.1\)",
    ):
        datasets.load_source(_wds_cfg(root))


def test_a_class_without_test_images_is_an_error_not_a_silent_subset(tmp_path):
    _write_folder(tmp_path)
    for image in (tmp_path / "test" / "dog").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="class dog has no test images"):
        datasets.load_source(DatasetConfig(source="folder", path=str(tmp_path)))
