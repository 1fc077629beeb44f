"""The streamed dataset path (``dataset.load: stream``): same data as the in-memory path, read by
index or by seeded epochs, and bad shards reported in one line (or skipped and counted)."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from condense import evaluate, teacher
from condense.config import DatasetConfig, DSAConfig, ModelConfig, PipelineConfig, TeacherConfig
from condense.configure import load_config
from condense.datasets.common import fit_image
from condense.datasets.generate import write_shards
from condense.errors import ConfigError, DatasetError
from condense.methods import get_method
from condense.methods.base import DistillInputs
from condense.prepare import load
from condense.stages import dataset as dataset_stage
from condense.stages.dataset import prepare
from condense.store import Store
from tests.conftest import memory_and_stream, run_pipeline


class _NoCheckpoints:
    def load(self):
        return None

    def save(self, state):
        pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 classes x 60 training and 20 test images of 16 px, 100 samples a shard (4 train shards)."""
    return write_shards(tmp_path_factory.mktemp("gen") / "shards", 5, 60, 20, 16, per_shard=100)


def test_stream_and_memory_give_the_same_data(shards: Path, tmp_path: Path) -> None:
    memory, stream = memory_and_stream(shards, tmp_path)
    assert stream.streamed and not memory.streamed
    assert torch.equal(memory.train_y, stream.train_y)
    assert torch.equal(memory.test_y, stream.test_y)
    assert stream.card["class_counts"] == memory.card["class_counts"] == [60] * 5
    np.testing.assert_allclose(stream.card["mean"], memory.card["mean"], rtol=1e-9)
    np.testing.assert_allclose(stream.card["std"], memory.card["std"], rtol=1e-9)
    idx = torch.tensor([299, 0, 150, 7, 7, 123])
    assert torch.equal(stream.images(idx), memory.images(idx))
    for (xs, ys), (xm, ym) in zip(stream.batches("test", 32), memory.batches("test", 32), strict=True):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)
    # The store keeps an index, not the decoded images.
    dataset_dir = next((tmp_path / "stream" / "dataset").iterdir())
    assert (dataset_dir / "index.zarr").is_dir() and not (dataset_dir / "data.zarr").exists()


def test_class_names_label_both_paths_and_stay_out_of_unnamed_sections(shards: Path, tmp_path: Path) -> None:
    names = ["ant", "bee", "cat", "dog", "eel"]
    memory, stream = memory_and_stream(shards, tmp_path / "named", class_names=names)
    assert memory.card["classes"] == stream.card["classes"] == names
    # Naming the classes is a different dataset; not naming them leaves the stage's section as it was.
    unnamed = DatasetConfig(source="webdataset", path=str(shards), load="memory")
    named = unnamed.model_copy(update={"class_names": names})
    assert prepare(named, Store(tmp_path / "a"))[0] != prepare(unnamed, Store(tmp_path / "b"))[0]
    section = dataset_stage.config(PipelineConfig(dataset=unnamed), {"fingerprint": "f", "load": "memory"})
    assert "class_names" not in section
    refusals = {"memory": "has cls 4, but dataset.class_names names 4", "stream": "outside the 4 classes"}
    for mode, message in refusals.items():
        short = unnamed.model_copy(update={"load": mode, "workers": 0, "class_names": names[:4]})
        with pytest.raises(DatasetError, match=message):
            prepare(short, Store(tmp_path / "short"))


def test_a_seeded_epoch_reads_every_sample_once_in_a_shuffled_order(shards: Path, tmp_path: Path) -> None:
    memory, stream = memory_and_stream(shards, tmp_path, shuffle_buffer=64)
    reference = {
        tuple(x.flatten()[:48].tolist()): int(y) for x, y in zip(memory.train_x, memory.train_y, strict=True)
    }

    def epoch(seed: int, data=stream) -> list[tuple[tuple, int]]:
        out = []
        for x, y in data.batches("train", 50, torch.Generator().manual_seed(seed)):
            out += [(tuple(xi.flatten()[:48].tolist()), int(yi)) for xi, yi in zip(x, y, strict=True)]
        return out

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert sorted(first) == sorted(reference.items())  # every image once, with its own label
    assert first == again
    assert first != other
    in_order = [
        (tuple(x.flatten()[:48].tolist()), int(y))
        for x, y in zip(memory.train_x, memory.train_y, strict=True)
    ]
    assert first != in_order
    # Worker processes read disjoint shards: the same samples again.
    stream.workers = 2
    assert sorted(epoch(0)) == sorted(first)


def test_rded_selects_the_same_images_from_both_paths(shards: Path, tmp_path: Path) -> None:
    memory, stream = memory_and_stream(shards, tmp_path)
    trained = teacher.train_teacher(
        memory,
        TeacherConfig(source="train", epochs=2, batch_size=64, dsa=False),
        ModelConfig(width=8),
        DSAConfig(),
        seed=0,
    )
    method = get_method("rded")
    cfg = method.config_cls(candidates=20, crops_per_image=3, min_teacher_accuracy=0)
    sets = [
        method.distill(
            DistillInputs(data, 2, 0, cfg, ModelConfig(width=8), DSAConfig(), teacher=trained.model),
            _NoCheckpoints(),
        )
        for data in (memory, stream)
    ]
    assert torch.equal(sets[0].images, sets[1].images)
    assert torch.equal(sets[0].labels, sets[1].labels)
    # And what it selected are real crops, not the random-real draw.
    x, _ = evaluate.random_real_subset(stream, 2, 0)
    assert not torch.equal(sets[1].images, x)


def test_a_teacher_trains_on_streamed_epochs(shards: Path, tmp_path: Path) -> None:
    _, stream = memory_and_stream(shards, tmp_path)
    cfg = TeacherConfig(source="train", epochs=3, batch_size=32, dsa=False)
    trained = teacher.train_teacher(stream, cfg, ModelConfig(width=8), DSAConfig(), seed=0)
    assert trained.test_accuracy > 60  # five classes: chance is 20
    assert trained.train_accuracy > 60


def test_a_streamed_pipeline_runs_rded_and_kd_evaluation(shards: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "digits-rded",
        [
            "dataset.source=webdataset",
            f"dataset.path={shards}",
            "dataset.load=stream",
            "dataset.workers=0",
            "teacher.epochs=2",
            "model.width=8",
            "distill.candidates=20",
            "evaluate.epochs=60",
            "ipc=2",
            "evaluate.seeds=1",
            "evaluate.full_data=false",
        ],
    )
    summary = run_pipeline(Store(tmp_path / "store"), cfg)
    assert summary["accuracy"]["convnet"]["mean"] > 40  # five classes: chance is 20


def test_steps_that_read_the_whole_split_are_refused_before_any_work(shards: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "digits-rded",
        [
            "dataset.source=webdataset",
            f"dataset.path={shards}",
            "dataset.load=stream",
            "dataset.workers=0",
            "teacher.epochs=1",
            "model.width=8",
            "distill.candidates=20",
            "evaluate.epochs=1",
            "evaluate.seeds=1",
        ],
    )
    with pytest.raises(ConfigError, match=r"full-data baseline \(evaluate.full_data\) read the whole"):
        run_pipeline(Store(tmp_path / "store"), cfg)


def test_auto_streams_above_the_size_threshold(shards: Path, tmp_path: Path) -> None:
    for threshold, expected in ((0.01, "stream"), (1000.0, "memory")):
        cfg = DatasetConfig(source="webdataset", path=str(shards), stream_above_mb=threshold, workers=0)
        store = Store(tmp_path / expected)
        key, _ = prepare(cfg, store)
        assert store.meta("dataset", key)["card"]["load"] == expected


def test_streamed_data_that_moved_is_found_by_shard_name(shards: Path, tmp_path: Path) -> None:
    here = tmp_path / "here"
    shutil.copytree(shards, here)
    cfg = DatasetConfig(source="webdataset", path=str(here), load="stream", workers=0)
    store = Store(tmp_path / "store")
    key, _ = prepare(cfg, store)
    before = load(store, key, cfg).images(torch.tensor([5, 250]))
    elsewhere = tmp_path / "elsewhere"
    here.rename(elsewhere)
    after = load(store, key, cfg.model_copy(update={"path": str(elsewhere)})).images(torch.tensor([5, 250]))
    assert torch.equal(before, after)
    fewer = write_shards(tmp_path / "fewer", 5, 60, 20, 16, per_shard=1000)  # one train shard
    with pytest.raises(DatasetError, match="not among the dataset's shards now"):
        load(store, key, cfg.model_copy(update={"path": str(fewer)}))


def _write(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture()
def bad_shards(tmp_path: Path) -> Path:
    """Two classes; the training shard has, in the middle, a sample whose JPEG is truncated garbage."""
    root = tmp_path / "bad"
    root.mkdir()
    train = [{"__key__": f"s{i:03d}", "jpg": _jpeg(40 * (i % 2)), "cls": str(i % 2)} for i in range(20)]
    train[9]["jpg"] = _jpeg(0)[:40]
    _write(root / "train-000000.tar", train)
    _write(
        root / "test-000000.tar", [{"__key__": f"t{i}", "jpg": _jpeg(0), "cls": str(i % 2)} for i in range(4)]
    )
    return root


def test_a_corrupt_image_mid_stream_is_an_error_naming_it_or_skipped_and_counted(
    bad_shards: Path, tmp_path: Path
) -> None:
    strict = DatasetConfig(
        source="webdataset", path=str(bad_shards), load="stream", workers=0, stats_images=4
    )
    store = Store(tmp_path / "store")
    key, _ = prepare(strict, store)  # the index reads no image data: the stats sample misses it
    data = load(store, key, strict)
    with pytest.raises(DatasetError, match=r"cannot decode image #9 in .*train-000000.tar"):
        list(data.batches("train", 4, torch.Generator().manual_seed(0)))
    lenient = strict.model_copy(update={"on_corrupt": "skip"})
    key, _ = prepare(lenient, store)
    data = load(store, key, lenient)
    seen = torch.cat([y for _, y in data.batches("train", 4, torch.Generator().manual_seed(0))])
    assert len(seen) == 19 and data.skipped["train"] == 1
    # The skipped sample's label went with it: the others keep theirs (19 left, 9 of class 1).
    assert int(seen.sum()) == 9
    # A draw by index must get what it asked for: an error, never a substitute.
    with pytest.raises(DatasetError, match="#9"):
        data.images(torch.tensor([9]))


def test_samples_without_labels_are_named_or_skipped(bad_shards: Path, tmp_path: Path) -> None:
    samples = [{"__key__": f"s{i:03d}", "jpg": _jpeg(0), "cls": str(i % 2)} for i in range(6)]
    samples[3]["cls"] = "cat"
    del samples[4]["cls"]
    _write(bad_shards / "train-000000.tar", samples)
    cfg = DatasetConfig(source="webdataset", path=str(bad_shards), load="stream", workers=0)
    with pytest.raises(DatasetError, match=r"sample s003 in .* has a non-integer 'cls'"):
        prepare(cfg, Store(tmp_path / "a"))
    store = Store(tmp_path / "b")
    key, _ = prepare(cfg.model_copy(update={"on_corrupt": "skip"}), store)
    card = store.meta("dataset", key)["card"]
    assert card["skipped"]["train"] == 2 and card["train_count"] == 4


def test_bad_inputs_are_one_line_errors(shards: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    nothing = DatasetConfig(
        source="webdataset",
        train_urls=str(tmp_path / "none-{0..3}.tar"),
        test_urls=str(tmp_path / "none-0.tar"),
        load="stream",
    )
    with pytest.raises(DatasetError, match="shard not found"):
        prepare(nothing, store)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no train shards"):
        prepare(DatasetConfig(source="webdataset", path=str(empty), load="stream"), store)
    with pytest.raises(DatasetError, match="ipc=61 is larger than the smallest class"):
        prepare(DatasetConfig(source="webdataset", path=str(shards), load="stream", workers=0), store, 61)
    gz = tmp_path / "gz"
    gz.mkdir()
    for name in ("train-000000.tar", "test-000000.tar"):
        (gz / f"{name}.gz").write_bytes(gzip.compress((shards / name).read_bytes()))
    with pytest.raises(DatasetError, match="gzip-compressed: streaming needs uncompressed"):
        prepare(DatasetConfig(source="webdataset", path=str(gz), load="stream"), store)
    with pytest.raises(DatasetError, match="reads WebDataset shards"):
        prepare(DatasetConfig(source="digits", load="stream"), store)


def test_stream_refuses_what_needs_the_whole_split(shards: Path, tmp_path: Path) -> None:
    _, stream = memory_and_stream(shards, tmp_path)
    with pytest.raises(DatasetError, match="set dataset.load: memory"):
        stream.train_x  # noqa: B018


def test_a_streamed_dataset_is_zca_whitened_like_the_in_memory_one(shards: Path, tmp_path: Path) -> None:
    memory, stream = memory_and_stream(shards, tmp_path, zca=True)
    assert stream.whitening is not None and memory.whitening is not None
    for name in ("mean", "transform", "inverse"):  # fitted on the same images in the same chunks
        assert torch.equal(getattr(stream.whitening, name), getattr(memory.whitening, name)), name
    idx = torch.tensor([299, 0, 150, 7])
    # Whitened per draw rather than all at once: equal up to the matrix product's rounding.
    torch.testing.assert_close(stream.images(idx), memory.images(idx), rtol=0, atol=1e-5)
    mean = torch.tensor(stream.card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stream.card["std"]).view(1, -1, 1, 1)
    normalised = (torch.from_numpy(stream.pixels(idx)).float() / 255 - mean) / std
    assert (stream.images(idx) - normalised).abs().mean() > 0.1  # whitened, not just normalised
    torch.testing.assert_close(stream.to_pixels(stream.images(idx)), memory.to_pixels(memory.images(idx)))
    x, y = next(stream.batches("test", 50))
    torch.testing.assert_close(x, memory.test_x[:50], rtol=0, atol=1e-5)


def test_the_imagenet_transform_resizes_the_short_side_and_cuts_the_centre() -> None:
    pixels = np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3)  # 40 wide, 20 high
    image = Image.fromarray(pixels)
    out = fit_image(image, 8, "imagenet")
    assert out.size == (8, 8)
    short = round(8 / 0.875)  # 9: the 256-for-224 rule
    resized = image.resize((short * 2, short), Image.Resampling.BILINEAR)
    left, top = (short * 2 - 8) // 2, (short - 8) // 2
    assert np.array_equal(np.asarray(out), np.asarray(resized)[top : top + 8, left : left + 8])
    assert fit_image(image, 8, "resize").size == (8, 8)  # squashed, not cropped


def _cut_at_a_block_boundary(path, keep_fraction: float) -> int:
    """Cut ``path`` after the member header block nearest ``keep_fraction`` of its samples, as an
    interrupted copy does (tar files are whole 512-byte blocks); returns the bytes kept."""
    import tarfile

    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    cut = offsets[int(len(offsets) * keep_fraction)]
    assert cut % 512 == 0
    path.write_bytes(path.read_bytes()[:cut])
    return cut


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_shard_cut_short_at_a_block_boundary_is_named_not_read_as_a_smaller_dataset(tmp_path, mode):
    shards = write_shards(tmp_path / "shards", 2, 9, 3, 8)
    _cut_at_a_block_boundary(shards / "train-000000.tar", 2 / 3)
    cfg = DatasetConfig(source="webdataset", path=str(shards), load=mode, workers=0)
    with pytest.raises(DatasetError, match=r"shard .*train-000000.tar is truncated"):
        prepare(cfg, Store(tmp_path / "store"))


def test_a_class_missing_from_training_blames_the_training_shards_not_the_test_split(tmp_path):
    root = tmp_path / "shards"
    write_shards(root, 3, 4, 2, 8)
    train = root / "train-000000.tar"
    kept = [s for s in wds.WebDataset(str(train), shardshuffle=False, empty_check=False) if s["cls"] != b"2"]
    with wds.TarWriter(str(train)) as sink:
        for sample in kept:
            sink.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "cls")})
    for mode in ("memory", "stream"):
        cfg = DatasetConfig(source="webdataset", path=str(root), load=mode, workers=0)
        with pytest.raises(
            DatasetError, match="has cls 2, but no training sample does .* missing or cut short"
        ):
            prepare(cfg, Store(tmp_path / mode))
