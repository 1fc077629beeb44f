from pathlib import Path

import pytest
import torch

from condense.config import DatasetConfig
from condense.errors import DatasetError
from condense.prepare import INPUT_STD_SAMPLE, STAGE, PreparedDataset, input_std, load
from condense.stages.dataset import prepare
from condense.store import Store, load_arrays


def test_digits_card_and_normalisation(tmp_path: Path):
    store = Store(tmp_path)
    key, cached = prepare(DatasetConfig(), store, ipc=10)
    assert not cached
    assert prepare(DatasetConfig(), store, ipc=10) == (key, True)
    data = load(store, key)
    card = data.card
    assert card["classes"] == [str(i) for i in range(10)]
    assert (card["channels"], card["resolution"]) == (1, 8)
    assert sum(card["class_counts"]) == card["train_count"] == len(data.train_y)
    # inputs are normalised with the training split's own statistics
    assert abs(float(data.train_x.mean())) < 1e-4 and abs(float(data.train_x.std()) - 1) < 1e-3
    pixels = data.to_pixels(data.train_x[:5])
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1


def test_ipc_larger_than_a_class_fails_before_writing(tmp_path: Path):
    store = Store(tmp_path / "store")
    with pytest.raises(DatasetError, match="ipc=500 is larger than the smallest class"):
        prepare(DatasetConfig(), store, ipc=500)
    assert not (tmp_path / "store").exists()


def test_zca_inputs_round_trip_to_pixels(tmp_path: Path):
    store = Store(tmp_path)
    key, _ = prepare(DatasetConfig(zca=True, train_per_class=30), store, ipc=1)
    data = load(store, key)
    assert data.whitening is not None and store.meta(STAGE, key)["card"]["zca"] is True
    stored = load_arrays(store.path(STAGE, key) / "data.zarr", ["train_x"])["train_x"][:4]
    expected = torch.from_numpy(stored).float() / 255
    assert not torch.allclose(data.train_x[:4], expected, atol=1e-2)  # whitened, not raw
    torch.testing.assert_close(data.to_pixels(data.train_x[:4]), expected, atol=1e-4, rtol=0)


def test_a_different_train_subset_is_a_different_dataset_key(tmp_path: Path):
    store = Store(tmp_path)
    a, _ = prepare(DatasetConfig(train_per_class=20), store, ipc=1)
    b, _ = prepare(DatasetConfig(train_per_class=30), store, ipc=1)
    assert a != b
    assert load(store, a).card["train_count"] == 200


def _dataset(train_x: torch.Tensor) -> PreparedDataset:
    labels = torch.zeros(len(train_x), dtype=torch.long)
    return PreparedDataset(train_x, labels, train_x[:0], labels[:0], card={})


def test_input_std_is_the_population_std_of_the_inputs():
    # Fewer images than the sample: every one is used; constant images 0..39 have the std of 0..39.
    ramp = torch.arange(40.0).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    assert input_std(_dataset(ramp), ramp[:1])["real"] == pytest.approx(((40**2 - 1) / 12) ** 0.5)
    # More than the sample: every image holds two -2s and two +2s, so any draw's population std is
    # exactly 2 (an unbiased estimate would be 2 * sqrt(2048 / 2047)).
    signs = torch.tensor([-2.0, 2.0, 2.0, -2.0]).view(1, 1, 2, 2).repeat(3 * INPUT_STD_SAMPLE, 1, 1, 1)
    assert input_std(_dataset(signs), ramp)["real"] == pytest.approx(2.0, rel=1e-9)
    # The synthetic side is the same estimator on the set itself.
    assert input_std(_dataset(signs), ramp)["synthetic"] == pytest.approx(((40**2 - 1) / 12) ** 0.5)
