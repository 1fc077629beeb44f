"""Gradient matching (DSA), distribution matching (DM) and DREAM on a tiny real digits subset: the
matching loss, DC's loop table, end-to-end runs, resume after a kill, divergence and DREAM's config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from condense.config import DatasetConfig, ModelConfig
from condense.configure import load_config
from condense.errors import ConfigError, DivergenceError
from condense.methods import dm, dream, dsa
from condense.methods.base import DistillInputs
from condense.methods.initial import initial_images
from condense.methods.matching import class_labels
from condense.models import ConvNet
from condense.prepare import PreparedDataset, load
from condense.progress import SILENT
from condense.stages.base import TorchCheckpoints
from condense.stages.dataset import prepare
from condense.store import Store
from condense.training import student_model
from tests.conftest import KillAfter, Notes

IPC = 2
# Narrow networks keep every run well under a second; the algorithms do not depend on the width.
MODEL = ModelConfig(width=16)
# Small enough for seconds on a CPU, big enough to run every code path: two matching passes with
# network training in between (DSA), and real batches smaller than a class (20 images), so DREAM's
# representative sampler really clusters, twice per network (interval 1).
TINY: dict[str, dict[str, Any]] = {
    "dsa": {"iterations": 4, "checkpoint_every": 2, "outer_loop": 2, "inner_loop": 2, "batch_real": 8},
    "dm": {"iterations": 4, "checkpoint_every": 2, "batch_real": 8},
    "dream-dsa": {"base": "dsa", "iterations": 4, "checkpoint_every": 2, "outer_loop": 2, "inner_loop": 2}
    | {"batch_real": 5, "interval": 1},
    "dream-dm": {"base": "dm", "iterations": 4, "checkpoint_every": 2, "batch_real": 5, "interval": 1},
}
METHODS = {
    "dsa": (dsa.DSAMatchConfig, dsa.distill),
    "dm": (dm.DMConfig, dm.distill),
    "dream-dsa": (dream.CONFIG, dream.distill),
    "dream-dm": (dream.CONFIG, dream.distill),
}
LABELS = {"dsa": "DSA", "dm": "DM", "dream-dsa": "DREAM (DSA)", "dream-dm": "DREAM (DM)"}


def _random_net(data):
    return lambda seed: student_model(data, MODEL, seed)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    store = Store(tmp_path_factory.mktemp("store"))
    key, _ = prepare(DatasetConfig(train_per_class=20), store, IPC)
    return load(store, key)


def make_inputs(data: PreparedDataset, name: str, **overrides: Any) -> DistillInputs:
    config_cls = METHODS[name][0]
    return DistillInputs(
        data=data,
        ipc=IPC,
        seed=0,
        method_cfg=config_cls(**(TINY[name] | overrides)),
        model_cfg=MODEL,
        dsa_cfg=load_config("digits-mtt").dsa,
    )


class MemoryCheckpoints:
    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        return self.state

    def save(self, state: dict[str, Any]) -> None:
        self.state = state


# ----------------------------------------------------------------------------- the matching loss


def test_match_loss_is_zero_for_identical_gradients_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 3, 3, 3, generator=g), torch.randn(10, 32, generator=g)]
    assert float(dsa.match_loss(grads, grads)) == pytest.approx(0, abs=1e-4)
    other = [torch.randn(x.shape, generator=g) for x in grads]
    assert float(dsa.match_loss(other, grads)) > 1
    # 1 - cosine per output row: orthogonal rows count 1 each, opposite rows 2 each
    eye = torch.eye(2)
    assert float(dsa.match_loss([eye.flip(0)], [eye])) == pytest.approx(2, abs=1e-4)
    assert float(dsa.match_loss([-eye], [eye])) == pytest.approx(4, abs=1e-4)


def test_match_loss_ignores_one_dimensional_tensors():
    weight = torch.randn(4, 6)
    without = dsa.match_loss([weight], [weight.flip(1)])
    with_biases = dsa.match_loss([weight, torch.ones(4)], [weight.flip(1), -torch.ones(4)])
    assert float(with_biases) == pytest.approx(float(without))


def test_match_loss_reaches_the_synthetic_gradients():
    g_syn = torch.randn(4, 6, requires_grad=True)
    dsa.match_loss([g_syn], [torch.randn(4, 6)]).backward()
    assert g_syn.grad is not None and g_syn.grad.abs().sum() > 0


def test_loops_follow_dc_table_and_fall_back_to_the_largest_listed_ipc_below():
    assert [dsa.get_loops(ipc) for ipc in (1, 10, 20, 30, 40, 50)] == [
        (1, 1),
        (10, 50),
        (20, 25),
        (30, 20),
        (40, 15),
        (50, 10),
    ]
    assert [dsa.get_loops(ipc) for ipc in (2, 9, 15, 100)] == [(1, 1), (1, 1), (10, 50), (50, 10)]
    cfg = dsa.DSAMatchConfig(inner_loop=3)
    assert dsa.loops(cfg, 10) == (10, 3)


def test_batchnorm_statistics_are_frozen_from_real_images(digits: PreparedDataset):
    net = ConvNet(
        digits.channels, digits.num_classes, digits.resolution, ModelConfig(width=8, norm="batchnorm")
    )
    dsa.freeze_batchnorm(net, digits, torch.Generator().manual_seed(0))
    norm = net.features[1]
    assert not norm.training and norm.num_batches_tracked == 1


# ----------------------------------------------------------------------------- end to end


def test_kmeans_init_takes_real_images_of_each_class(digits: PreparedDataset):
    images = initial_images(digits, IPC, "kmeans", torch.Generator().manual_seed(0), _random_net(digits))
    labels = class_labels(range(digits.num_classes), IPC)
    for image, label in zip(images, labels, strict=True):
        matches = (digits.train_x == image).flatten(1).all(1)
        assert bool(matches.any()) and int(digits.train_y[matches][0]) == int(label)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_tiny_run_changes_the_images_and_records_every_iteration(digits: PreparedDataset, name: str):
    inputs = make_inputs(digits, name)
    cfg = inputs.method_cfg
    result = METHODS[name][1](inputs, MemoryCheckpoints(), SILENT)
    init = cfg.init
    start = initial_images(digits, IPC, init, torch.Generator().manual_seed(0), _random_net(digits))
    assert result.images.shape == start.shape
    assert torch.isfinite(result.images).all()
    assert (result.images - start).abs().max() > 1e-3
    assert torch.equal(result.labels, torch.arange(10).repeat_interleave(IPC))
    assert result.lr is None
    assert [h["iteration"] for h in result.history] == list(range(1, cfg.iterations + 1))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert set(result.stats) == {"feature_seconds", "kmeans_seconds", "reclusters"}


@pytest.mark.parametrize("name", ["dream-dsa", "dream-dm"])
def test_dream_reports_the_representative_sampler_cost(digits: PreparedDataset, name: str):
    result = METHODS[name][1](make_inputs(digits, name), MemoryCheckpoints(), SILENT)
    reclusters = [h["reclusters"] for h in result.history]
    assert reclusters == sorted(reclusters) and reclusters[0] > 0
    assert result.stats["reclusters"] == reclusters[-1] > 0
    assert result.stats["kmeans_seconds"] > 0 and result.stats["feature_seconds"] > 0


def test_random_sampling_reports_no_clustering(digits: PreparedDataset):
    result = dm.distill(make_inputs(digits, "dm"), MemoryCheckpoints(), SILENT)
    assert result.stats["reclusters"] == 0 and result.history[-1]["reclusters"] == 0


@pytest.mark.parametrize("name", ["dsa", "dm", "dream-dsa"])
def test_a_killed_run_resumes_and_matches_an_uninterrupted_run(digits: PreparedDataset, tmp_path: Path, name):
    distill = METHODS[name][1]
    checkpoints = TorchCheckpoints(tmp_path / "checkpoint.pt")
    with pytest.raises(KeyboardInterrupt):
        distill(make_inputs(digits, name), KillAfter(checkpoints, saves=1), SILENT)
    assert checkpoints.load()["iteration"] == 2

    recorder = Notes()
    resumed = distill(make_inputs(digits, name), checkpoints, recorder)
    assert any(f"resuming {LABELS[name]} from checkpoint at iteration 2/4" in n for n in recorder.lines)

    uninterrupted = distill(make_inputs(digits, name), MemoryCheckpoints(), SILENT)
    assert resumed.images.numpy().tobytes() == uninterrupted.images.numpy().tobytes()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in uninterrupted.history]
    assert resumed.stats["reclusters"] == uninterrupted.stats["reclusters"]


@pytest.mark.parametrize("name", ["dsa", "dm"])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(digits: PreparedDataset, name: str):
    checkpoints = MemoryCheckpoints()
    # One matching pass per iteration, so the blow-up shows in the second iteration, after a checkpoint.
    extra = {"outer_loop": 1} if name == "dsa" else {}
    inputs = make_inputs(digits, name, lr_img=1e30, checkpoint_every=1, **extra)
    with pytest.raises(DivergenceError, match="diverged at iteration .* last good checkpoint: iteration"):
        METHODS[name][1](inputs, checkpoints, SILENT)
    assert checkpoints.state is not None and torch.isfinite(checkpoints.state["images"]).all()


# ----------------------------------------------------------------------------- DREAM's config


def test_dream_is_its_base_with_representative_batches_and_kmeans_init():
    on_dsa = dream.CONFIG()
    assert isinstance(on_dsa, dsa.DSAMatchConfig) and on_dsa.base == "dsa"
    assert (on_dsa.sampler, on_dsa.init, on_dsa.lr_img, on_dsa.lr_net) == (
        "representative",
        "kmeans",
        0.1,
        0.01,
    )
    on_dm = dream.CONFIG(base="dm", interval=3)
    assert isinstance(on_dm, dm.DMConfig) and not isinstance(on_dm, dsa.DSAMatchConfig)
    assert (on_dm.sampler, on_dm.lr_img, on_dm.interval) == ("representative", 1.0, 3)
    assert dream.CONFIG(lr_img=0.5, init="real").lr_img == 0.5
    # Every setting of each base is DREAM's, and nothing else is (but ``base``).
    for base, config in (("dsa", dsa.DSAMatchConfig), ("dm", dm.DMConfig)):
        assert set(type(dream.CONFIG(base=base)).model_fields) == {*config.model_fields, "base"}


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"base": "dm", "lr_net": 0.1}, "lr_net\n.*Extra inputs"),
        ({"base": "dm", "outer_loop": 2}, "outer_loop\n.*Extra inputs"),
        ({"sampler": "random"}, "sampler\n.*Input should be 'representative'"),
        ({"lr_img": -1}, "lr_img\n.*greater than 0"),
        ({"base": "idc"}, "distill.base: 'idc' is not one of dsa, dm"),
    ],
)
def test_dream_config_rejects_settings_its_base_does_not_have(values: dict[str, Any], error: str):
    with pytest.raises((ValueError, ConfigError), match=error):
        dream.CONFIG(**values)
