"""The Hugging Face ``datasets`` source (decoded into memory, or streamed by row) and the ``--format hf``
export, on tiny DatasetDicts saved in tmp_path (scikit-learn digits, small generated RGB images). No
network: hub ids (``dataset.hf_name``) are not loaded here."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from condense import datasets as sources
from condense.config import DatasetConfig
from condense.datasets import huggingface
from condense.errors import DatasetError
from condense.export import write_distilled
from condense.prepare import load
from condense.stages.dataset import prepare
from condense.store import Store

hf = pytest.importorskip("datasets")

NAMES = ["zero", "one", "two", "three"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


@pytest.fixture(autouse=True)
def _quiet():
    """No progress bars from save_to_disk; the switch is global, so it is put back."""
    was_off = hf.are_progress_bars_disabled()
    hf.disable_progress_bars()
    yield
    if not was_off:
        hf.enable_progress_bars()


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (N, 8, 8) digits of the four first classes, in the data's own (interleaved) order."""
    x, y = load_digits(return_X_y=True)
    keep = y < len(NAMES)
    x = (x[keep].reshape(-1, 8, 8) * 15).astype(np.uint8)
    y = y[keep].astype(np.int64)
    train = np.concatenate([np.flatnonzero(y == c)[:TRAIN_PER_CLASS] for c in range(len(NAMES))])
    test = np.concatenate([np.flatnonzero(y == c)[-TEST_PER_CLASS:] for c in range(len(NAMES))])
    train, test = np.sort(train), np.sort(test)
    return x[train], y[train], x[test], y[test]


def _split(images: np.ndarray, labels: np.ndarray, image: str = "image", label: str = "label"):
    columns = {
        image: [Image.fromarray(img) for img in images],
        label: labels.tolist(),
        "id": list(range(len(labels))),
    }
    features = {image: hf.Image(), label: hf.ClassLabel(names=NAMES), "id": hf.Value("int64")}
    return hf.Dataset.from_dict(columns, features=hf.Features(features))


def _save(root, test_split: str = "test", **columns):
    train_x, train_y, test_x, test_y = _digits()
    hf.DatasetDict(
        {"train": _split(train_x, train_y, **columns), test_split: _split(test_x, test_y, **columns)}
    ).save_to_disk(str(root))
    return root


def _cfg(root, **settings) -> DatasetConfig:
    return DatasetConfig(source="huggingface", name="digits-hf", path=str(root), **settings)


# ----------------------------------------------------------------------------------------- source


@pytest.mark.parametrize("test_split", ["test", "validation"])
def test_a_saved_dataset_dict_loads_with_its_images_labels_and_class_names(tmp_path, test_split):
    raw = sources.load_source(_cfg(_save(tmp_path / "hf", test_split)))
    train_x, train_y, test_x, test_y = _digits()
    assert raw.classes == NAMES
    assert raw.train_x.shape == (len(train_y), 1, 8, 8) and raw.train_x.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_x[:, 0], train_x)
    np.testing.assert_array_equal(raw.train_y, train_y)
    np.testing.assert_array_equal(raw.test_x[:, 0], test_x)
    np.testing.assert_array_equal(raw.test_y, test_y)
    assert len(set(train_y[:4].tolist())) > 1  # reading order is the saved order, not sorted by class


def test_columns_are_found_by_their_features_or_named(tmp_path):
    root = _save(tmp_path / "hf", image="pixels", label="digit")
    raw = sources.load_source(_cfg(root))
    np.testing.assert_array_equal(raw.train_y, _digits()[1])
    named = sources.load_source(_cfg(root, hf_image_column="pixels", hf_label_column="digit"))
    np.testing.assert_array_equal(named.train_x, raw.train_x)
    with pytest.raises(DatasetError, match=r"hf_label_column 'id' is a Value, not a ClassLabel feature"):
        sources.load_source(_cfg(root, hf_label_column="id"))


def test_two_image_columns_need_a_setting_and_the_message_lists_them(tmp_path):
    train_x, train_y, test_x, test_y = _digits()
    splits = {}
    for split, (x, y) in {"train": (train_x, train_y), "test": (test_x, test_y)}.items():
        columns = {
            "a": [Image.fromarray(img) for img in x],
            "label": y.tolist(),
            "id": list(range(len(y))),
            "b": [Image.fromarray(255 - img) for img in x],
        }
        features = {"a": hf.Image(), "label": hf.ClassLabel(names=NAMES), "id": hf.Value("int64")}
        features["b"] = hf.Image()
        splits[split] = hf.Dataset.from_dict(columns, features=hf.Features(features))
    hf.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DatasetError) as err:
        sources.load_source(_cfg(tmp_path / "hf"))
    assert str(err.value) == (
        "2 Image columns; set dataset.hf_image_column; columns: a (Image), label (ClassLabel), id (Value),"
        " b (Image)"
    )
    inverted = sources.load_source(_cfg(tmp_path / "hf", hf_image_column="b"))
    np.testing.assert_array_equal(inverted.train_x[:, 0], 255 - train_x)


def test_train_per_class_and_resolution(tmp_path):
    root = _save(tmp_path / "hf")
    train_x, train_y, _, _ = _digits()
    raw = sources.load_source(_cfg(root, train_per_class=2, resolution=4))
    first_two = np.concatenate([np.flatnonzero(train_y == c)[:2] for c in range(len(NAMES))])
    first_two.sort()
    np.testing.assert_array_equal(raw.train_y, train_y[first_two])
    resized = [np.asarray(Image.fromarray(img).resize((4, 4), Image.Resampling.BILINEAR)) for img in train_x]
    np.testing.assert_array_equal(raw.train_x[:, 0], np.stack(resized)[first_two])
    assert raw.test_x.shape == (len(NAMES) * TEST_PER_CLASS, 1, 4, 4)


def test_fingerprint_is_the_content_not_the_folder(tmp_path):
    root = _save(tmp_path / "hf")
    before = sources.source_fingerprint(_cfg(root))
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    assert sources.source_fingerprint(_cfg(copy)) == before
    assert sources.source_fingerprint(_cfg(root, train_per_class=2)) != before
    assert sources.source_fingerprint(_cfg(root, hf_label_column="label")) != before

    train_x, train_y, test_x, test_y = _digits()
    train_x = train_x.copy()
    train_x[5, 3, 3] ^= 0xFF  # one pixel of one image
    changed = tmp_path / "changed"
    hf.DatasetDict({"train": _split(train_x, train_y), "test": _split(test_x, test_y)}).save_to_disk(
        str(changed)
    )
    assert sources.source_fingerprint(_cfg(changed)) != before
    assert sources.source_fingerprint(DatasetConfig(source="huggingface", hf_name="user/data")) is None


def test_a_missing_label_column_is_one_line_listing_the_columns(tmp_path):
    train_x, train_y, test_x, test_y = _digits()
    hf.DatasetDict(
        {
            "train": _split(train_x, train_y).remove_columns("label"),
            "test": _split(test_x, test_y).remove_columns("label"),
        }
    ).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DatasetError) as err:
        sources.load_source(_cfg(tmp_path / "hf"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no ClassLabel column")
    assert message.endswith("set dataset.hf_label_column; columns: image (Image), id (Value)")
    with pytest.raises(
        DatasetError, match=r"hf_label_column 'cls' is not a column; columns: image \(Image\)"
    ):
        sources.load_source(_cfg(tmp_path / "hf", hf_label_column="cls"))


def test_missing_splits_paths_and_folders_are_named(tmp_path):
    train_x, train_y, _, _ = _digits()
    hf.DatasetDict({"train": _split(train_x, train_y)}).save_to_disk(str(tmp_path / "only-train"))
    with pytest.raises(
        DatasetError, match=r"has no test split \(test/validation/valid/val\); its splits are train"
    ):
        sources.load_source(_cfg(tmp_path / "only-train"))
    _split(train_x, train_y).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DatasetError, match="is a single split; save a DatasetDict"):
        sources.load_source(_cfg(tmp_path / "one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"^cannot open .*empty: FileNotFoundError"):
        sources.load_source(_cfg(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="holds no .arrow files"):
        sources.source_fingerprint(_cfg(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="dataset path not found"):
        sources.load_source(_cfg(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="needs dataset.path .* or dataset.hf_name"):
        sources.load_source(DatasetConfig(source="huggingface"))


def test_random_access_reads_labels_without_decoding_and_images_by_index(tmp_path, monkeypatch):
    cfg = _cfg(_save(tmp_path / "hf", image="pixels", label="digit"))
    train_x, train_y, test_x, test_y = _digits()
    train = huggingface.hf_split(cfg, "train")
    assert train.column_names == ["image", "label"]
    assert huggingface.class_names(train) == NAMES

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    with monkeypatch.context() as m:
        m.setattr(hf.Image, "decode_example", no_decoding)
        np.testing.assert_array_equal(huggingface.labels(train), train_y)
        np.testing.assert_array_equal(huggingface.labels(huggingface.hf_split(cfg, "test")), test_y)
    picked = huggingface.read_images(train, np.array([7, 0, 7]))
    assert all(isinstance(img, Image.Image) for img in picked)
    np.testing.assert_array_equal(np.stack([np.asarray(img) for img in picked]), train_x[[7, 0, 7]])
    assert huggingface.read_images(train, []) == []


def test_without_the_datasets_package_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    root = _save(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetError) as err:
        sources.load_source(_cfg(root))
    assert str(err.value) == (
        "dataset.source huggingface needs the 'datasets' package: pip install 'condense[hf]'"
    )


def test_importing_condense_does_not_import_datasets():
    modules = "condense, condense.datasets, condense.export, condense.distilled, condense.convert"
    code = f"import sys, {modules}; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -------------------------------------------------------------------------------------- streaming


def _png(img: Image.Image, orientation: int | None = None) -> dict:
    """An ``Image`` value holding PNG bytes as stored (an EXIF orientation kept, unlike PIL input)."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    return {"bytes": buf.getvalue(), "path": None}


def _stream_images(kind: str, per_class: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """``gray``: 8 px digits (the data's own order). ``rgb``: RGB images of different non-square sizes
    with a few gray, palette and EXIF-rotated ones (resolution must be set), classes interleaved."""
    if kind == "gray":
        x, y = load_digits(return_X_y=True)
        rows = np.sort(np.concatenate([np.flatnonzero(y == c)[seed : seed + per_class] for c in range(4)]))
        images = [Image.fromarray((x[r].reshape(8, 8) * 15).astype(np.uint8)) for r in rows]
        return [_png(img) for img in images], y[rows].astype(np.int64)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(NAMES)), per_class))
    values = []
    for i in range(len(labels)):
        h, w = int(rng.integers(6, 14)), int(rng.integers(6, 14))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 7 == 1:
            img = img.convert("L")
        elif i % 7 == 3:
            img = img.convert("P")
        values.append(_png(img, orientation=6 if i % 5 == 2 else None))
    return values, labels


def _save_stream(root, kind: str):
    splits = {}
    for split, per_class, seed in (("train", 20, 0), ("test", 5, 100)):
        values, y = _stream_images(kind, per_class, seed)
        features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=NAMES)})
        splits[split] = hf.Dataset.from_dict({"image": values, "label": y.tolist()}, features=features)
    hf.DatasetDict(splits).save_to_disk(str(root))
    return root


def _memory_and_stream(root, tmp_path, **settings):
    out = {}
    for mode in ("memory", "stream"):
        cfg = _cfg(root, load=mode, workers=0, **settings)
        store = Store(tmp_path / f"store-{mode}")
        key, _ = prepare(cfg, store)
        out[mode] = load(store, key, cfg)
    return out["memory"], out["stream"]


def _count_decodes(monkeypatch) -> list[int]:
    """Counts images decoded by the ``Image`` feature (every path that reads an image goes through it)."""
    calls = [0]
    decode = hf.Image.decode_example

    def counted(self, value, *args, **kwargs):
        calls[0] += 1
        return decode(self, value, *args, **kwargs)

    monkeypatch.setattr(hf.Image, "decode_example", counted)
    return calls


STREAM_CASES = {
    "gray": {},
    "rgb": {"resolution": 6, "transform": "imagenet", "train_per_class": 15},
}


@pytest.mark.parametrize("kind", sorted(STREAM_CASES))
def test_stream_and_memory_give_the_same_images_labels_and_test_batches(tmp_path, kind, monkeypatch):
    root = _save_stream(tmp_path / "hf", kind)
    settings = STREAM_CASES[kind]
    memory, stream = _memory_and_stream(root, tmp_path, **settings)
    assert stream.streamed and not memory.streamed
    assert stream.card["load"] == "stream" and stream.card["source"] == "huggingface"
    assert stream.card["classes"] == memory.card["classes"] == NAMES
    assert stream.channels == memory.channels == (1 if kind == "gray" else 3)
    assert stream.card["class_counts"] == memory.card["class_counts"]
    assert torch.equal(stream.train_y, memory.train_y) and torch.equal(stream.test_y, memory.test_y)
    np.testing.assert_allclose(stream.card["mean"], memory.card["mean"], rtol=1e-9)
    np.testing.assert_allclose(stream.card["std"], memory.card["std"], rtol=1e-9)

    raw = sources.load_source(_cfg(root, **settings))  # the in-memory path's uint8 pixels
    idx = torch.tensor([len(raw.train_y) - 1, 0, 17, 2, 2, 9])
    calls = _count_decodes(monkeypatch)
    np.testing.assert_array_equal(stream.pixels(idx), raw.train_x[idx.numpy()])
    assert calls[0] == len(idx)  # a draw reads the rows asked, not the split
    assert torch.equal(stream.images(idx), memory.images(idx))
    batches = list(zip(stream.batches("test", 3), memory.batches("test", 3), strict=True))
    assert len(batches) == -(-len(raw.test_y) // 3)
    for (xs, ys), (xm, ym) in batches:
        assert torch.equal(xs, xm) and torch.equal(ys, ym)

    stored = next((tmp_path / "store-stream" / "dataset").iterdir())
    assert (stored / "index.zarr").is_dir() and not (stored / "data.zarr").exists()


def test_streaming_decodes_only_the_statistics_sample_and_what_is_drawn(tmp_path, monkeypatch):
    root = _save_stream(tmp_path / "hf", "gray")
    cfg = _cfg(root, load="stream", workers=0, stats_images=8)
    store = Store(tmp_path / "store")
    calls = _count_decodes(monkeypatch)
    key, _ = prepare(cfg, store)
    prepared = calls[0]
    # Mean/std on 8 training images (each opened for its mode, then decoded) and the first one's
    # size: never all 80 training or 20 test images.
    assert 0 < prepared <= 2 * 8 + 1
    stream = load(store, key, cfg)
    assert len(stream.train_y) == 80 and len(stream.test_y) == 20 and calls[0] == prepared
    drawn = stream.images(torch.tensor([3, 70]))
    assert calls[0] == prepared + 2
    # Without the config, the dataset is opened where it was when indexed.
    assert torch.equal(load(store, key).images(torch.tensor([3, 70])), drawn)


def test_a_seeded_stream_epoch_reads_every_training_row_once_in_a_shuffled_order(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface, "ROW_BLOCK", 8)  # 80 rows: 10 blocks, read in a seeded order
    root = _save_stream(tmp_path / "hf", "gray")
    memory, stream = _memory_and_stream(root, tmp_path, shuffle_buffer=8)
    assert len(stream.indexes["train"].shards) == 10
    in_order = [
        (tuple(x.flatten().tolist()), int(y)) for x, y in zip(memory.train_x, memory.train_y, strict=True)
    ]

    def epoch(seed: int) -> list[tuple[tuple, int]]:
        out = []
        for x, y in stream.batches("train", 16, torch.Generator().manual_seed(seed)):
            assert len(y) <= 16
            out += [(tuple(xi.flatten().tolist()), int(yi)) for xi, yi in zip(x, y, strict=True)]
        return out

    first = epoch(0)
    assert sorted(first) == sorted(in_order)  # every row once, with its own label
    assert first == epoch(0)
    assert first != epoch(1)
    assert first != in_order
    # Read in row order through a buffer of 8, the k-th sample out would be one of rows 0..k+7; the
    # blocks are read in a shuffled order, so some sample comes out earlier than that.
    rows = [in_order.index(sample) for sample in first]
    assert any(row > k + 7 for k, row in enumerate(rows))
    stream.workers = 2  # DataLoader workers, each opening the split itself: the same rows again
    assert sorted(epoch(0)) == sorted(in_order)


def test_auto_streams_a_huggingface_dataset_above_the_size_threshold(tmp_path):
    root = _save_stream(tmp_path / "hf", "gray")
    arrow = sum(p.stat().st_size for p in (root / "train").glob("*.arrow"))
    assert huggingface.encoded_bytes(_cfg(root)) == arrow > 0
    for threshold, expected in ((arrow / 2**20 / 2, "stream"), (arrow / 2**20 * 2, "memory")):
        cfg = _cfg(root, stream_above_mb=threshold, workers=0)
        store = Store(tmp_path / expected)
        key, _ = prepare(cfg, store)
        assert store.meta("dataset", key)["card"]["load"] == expected
        assert load(store, key, cfg).streamed == (expected == "stream")


# ----------------------------------------------------------------------------------------- export


def _distilled(folder, soft: bool = True, logits: bool = False):
    """A distilled set in the export's own format: 2 images per class, soft labels, [0, 1] pixels."""
    rng = np.random.default_rng(0)
    n = 2 * len(NAMES)
    pixels = rng.random((n, 1, 8, 8)).astype(np.float32)
    labels = np.repeat(np.arange(len(NAMES)), 2)
    probabilities = rng.dirichlet(np.ones(len(NAMES)), size=n).astype(np.float32) if soft else None
    learned = rng.normal(size=(n, len(NAMES))).astype(np.float32) if logits else None
    manifest = {"method": "m", "ipc": 2, "classes": NAMES, "source_fingerprint": "f"}
    write_distilled(folder, pixels * 2 - 1, pixels, labels, probabilities, manifest, label_logits=learned)
    viewable = (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)  # what the export's PNGs hold
    return viewable, labels, probabilities, learned


def _export_cli(*args: str):
    from condense_flows.cli import app

    return CliRunner().invoke(app, ["export", *args])


def test_export_format_hf_round_trips_through_the_huggingface_source(tmp_path):
    viewable, labels, soft, _ = _distilled(tmp_path / "export")
    out = tmp_path / "hf-export"
    result = _export_cli(str(tmp_path / "export"), "--to", str(out), "--format", "hf")
    assert result.exit_code == 0, result.output
    assert "Hugging Face datasets folder" in result.output

    saved = hf.load_from_disk(str(out))
    assert list(saved) == ["train"]
    assert saved["train"].column_names == ["image", "label", "soft_label"]
    assert saved["train"].features["label"].names == NAMES
    np.testing.assert_allclose(np.asarray(saved["train"]["soft_label"], dtype=np.float32), soft)

    # Random access, as streaming reads it.
    train = huggingface.hf_split(_cfg(out), "train")
    np.testing.assert_array_equal(huggingface.labels(train), labels)
    read = huggingface.read_images(train, range(len(labels)))
    np.testing.assert_array_equal(np.stack([np.asarray(img) for img in read]), viewable[:, 0])

    # As training data of a run: the export's train split next to a test split of real digits.
    _, _, test_x, test_y = _digits()
    both = tmp_path / "with-test"
    hf.DatasetDict({"train": saved["train"], "test": _split(test_x, test_y)}).save_to_disk(str(both))
    raw = sources.load_source(_cfg(both))
    assert raw.classes == NAMES
    np.testing.assert_array_equal(raw.train_x, viewable)
    np.testing.assert_array_equal(raw.train_y, labels)


def test_export_format_hf_carries_learned_logits_and_refuses_a_non_empty_folder(tmp_path):
    _, labels, _, learned = _distilled(tmp_path / "export", soft=False, logits=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    refused = _export_cli(str(tmp_path / "export"), "--to", str(out), "--format", "hf")
    assert refused.exit_code == 1 and "is not empty; pass --overwrite" in refused.output
    assert (out / "mine.txt").read_text() == "mine"

    done = _export_cli(str(tmp_path / "export"), "--to", str(out), "--format", "hf", "--overwrite")
    assert done.exit_code == 0, done.output
    saved = hf.load_from_disk(str(out))["train"]
    assert saved.column_names == ["image", "label", "logits"]  # no soft labels in this set
    np.testing.assert_allclose(np.asarray(saved["logits"], dtype=np.float32), learned)
    np.testing.assert_array_equal(np.asarray(saved["label"]), labels)
    assert not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]  # no staging left

    bad = _export_cli(str(tmp_path / "export"), "--to", str(tmp_path / "x"), "--format", "parquet")
    assert bad.exit_code == 2 and "--format must be 'folder' or 'hf'" in bad.output


def test_export_format_hf_without_the_package_is_one_line(tmp_path, monkeypatch):
    _distilled(tmp_path / "export")
    monkeypatch.setitem(sys.modules, "datasets", None)
    result = _export_cli(str(tmp_path / "export"), "--to", str(tmp_path / "out"), "--format", "hf")
    assert result.exit_code == 1
    assert "--format hf needs the 'datasets' package: pip install 'condense[hf]'" in result.output
    assert not (tmp_path / "out").exists()


def test_png_bytes_are_stored_as_exported(tmp_path):
    """The image column holds the export's PNG bytes themselves, not a re-encoding."""
    _distilled(tmp_path / "export")
    out = tmp_path / "hf-export"
    assert _export_cli(str(tmp_path / "export"), "--to", str(out), "--format", "hf").exit_code == 0
    stored = hf.load_from_disk(str(out))["train"].cast_column("image", hf.Image(decode=False))
    first = stored[0]["image"]["bytes"]
    assert first[:4] == b"\x89PNG"
    assert Image.open(io.BytesIO(first)).size == (8, 8)
