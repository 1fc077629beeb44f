"""The Hugging Face ``datasets`` source and the ``--format hf`` export, on tiny DatasetDicts saved in
tmp_path (scikit-learn digits). No network: hub ids (``dataset.hf_name``) are not loaded here."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from condense import datasets as sources
from condense.config import DatasetConfig
from condense.datasets import huggingface
from condense.errors import DatasetError
from condense.export import write_distilled

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
    code = "import sys, condense, condense.datasets, condense.export; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
