"""DataDAM: the attention map and loss against their formulas, the loss falling in a short run, a
distilled digits set beating random real images end to end, resume after a kill, and class shards."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

import numpy as np
import pytest
import torch

from condense.config import ModelConfig
from condense.configure import load_config
from condense.errors import ConfigError
from condense.methods import datadam
from condense.methods.base import DistillInputs
from condense.models import ConvNet
from condense.prepare import PreparedDataset
from condense.progress import SILENT
from condense.stages import base
from condense.store import Store, load_arrays
from tests.conftest import Notes, kill_distillation_at_first_checkpoint, plan_for, run_jobs, run_pipeline
from tests.test_matching import MemoryCheckpoints

# Two blocks: DataDAM matches the attention of every block but the last, and digits' 8 px default
# ConvNet has one. Narrow, so a run takes seconds.
MODEL = ModelConfig(width=16, depth=2)
TINY = [
    "compute.device=cpu",
    "distill.batch_real=8",
    "experts.epochs=1",
    "evaluate.full_data=false",
    "evaluate.seeds=2",
]
"""Pipeline settings for digits-datadam (its recipe already gives the ConvNet two blocks)."""

# Two images of two channels over a 2x2 grid.
ACTIVATION = torch.tensor(
    [
        [[[1.0, -2.0], [0.0, 3.0]], [[2.0, 0.0], [1.0, -1.0]]],
        [[[0.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 0.0]]],
    ]
)


@pytest.mark.parametrize(
    ("power", "first", "second"),
    [
        # sum over channels of |a|: [3, 2, 1, 4] and [0, 1, 0, 2]
        (1.0, [3, 2, 1, 4], [0, 1, 0, 2]),
        # of a^4: [1 + 16, 16 + 0, 0 + 1, 81 + 1] and [0, 1, 0, 16]
        (4.0, [17, 16, 1, 82], [0, 1, 0, 16]),
    ],
)
def test_the_attention_map_is_the_unit_channel_sum_of_powers(power, first, second):
    expected = torch.tensor([first, second], dtype=torch.float32)
    expected /= torch.tensor([math.sqrt(sum(v * v for v in first)), math.sqrt(sum(v * v for v in second))])[
        :, None
    ]
    assert torch.allclose(datadam.attention_map(ACTIVATION, power), expected, atol=1e-6)


def test_the_attention_loss_is_the_distance_between_mean_maps():
    real = [ACTIVATION, ACTIVATION[:, :1]]  # two blocks
    syn = [ACTIVATION[:1], ACTIVATION[1:, :1]]
    # Block 1: the mean of both images' maps against the first image's map.
    first = torch.tensor([3.0, 2, 1, 4]) / math.sqrt(30)
    second = torch.tensor([0.0, 1, 0, 2]) / math.sqrt(5)
    block1 = ((first + second) / 2 - first).pow(2).sum()
    # Block 2, channel 0 alone: maps [1, 2, 0, 3] / sqrt(14) and [0, 0, 0, 2] / 2.
    one, two = torch.tensor([1.0, 2, 0, 3]) / math.sqrt(14), torch.tensor([0.0, 0, 0, 1])
    block2 = ((one + two) / 2 - two).pow(2).sum()
    assert float(datadam.attention_loss(real, syn, 1.0)) == pytest.approx(float(block1 + block2), rel=1e-6)


def test_the_attention_loss_is_zero_for_identical_batches(digits30: PreparedDataset):
    net = ConvNet(digits30.channels, digits30.num_classes, digits30.resolution, MODEL).requires_grad_(False)
    images = digits30.train_x[:12]
    blocks, _ = net.block_activations(images)
    assert len(blocks) == 2
    assert float(datadam.attention_loss(blocks, net.block_activations(images.clone())[0], 4.0)) == 0.0
    other, _ = net.block_activations(digits30.train_x[12:24])
    assert float(datadam.attention_loss(blocks, other, 4.0)) > 1e-4


def test_the_attention_loss_falls_over_a_short_run(digits30: PreparedDataset):
    # task_balance 0: the loss recorded is the attention term alone (times 100), per class. Each
    # iteration draws another network, so the curve is noisy: its last three average 0.35x its first three.
    cfg = datadam.DataDAMConfig(iterations=20, batch_real=8, task_balance=0, init="noise")
    inputs = DistillInputs(digits30, 2, 0, cfg, MODEL, load_config("digits-mtt").dsa)
    losses = [h["loss"] for h in datadam.distill(inputs, MemoryCheckpoints(), SILENT).history]
    assert mean(losses[-3:]) < 0.6 * mean(losses[:3]), losses


def test_a_one_block_convnet_is_refused(digits30: PreparedDataset):
    cfg = datadam.DataDAMConfig(iterations=1)
    inputs = DistillInputs(digits30, 1, 0, cfg, ModelConfig(width=16), load_config("digits-mtt").dsa)
    with pytest.raises(ConfigError, match="this ConvNet has 1 block \\(8 px images\\): set model.depth"):
        datadam.distill(inputs, MemoryCheckpoints(), SILENT)


def test_distilled_digits_beat_random_real_ones(tmp_path: Path):
    cfg = load_config("digits-datadam", [*TINY, "distill.iterations=100", "evaluate.epochs=100"])
    summary = run_pipeline(Store(tmp_path), cfg)
    distilled, random_real = summary["accuracy"]["convnet"], summary["baselines"]["random_real"]
    # Ten distilled digits against ten random real ones, two students each: 91.1 vs 73.2 here.
    assert len(distilled["runs"]) == 2 and distilled["mean"] > random_real["mean"] + 10


def test_a_killed_distillation_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    cfg = load_config(
        "digits-datadam", [*TINY, "model.width=16", "distill.iterations=4", "distill.checkpoint_every=2"]
    )
    store = Store(tmp_path / "killed")
    plan = plan_for(store, cfg)
    key = plan.keys["distill"]
    kill_distillation_at_first_checkpoint(store, cfg, plan, monkeypatch)
    assert not store.has("distill", key)
    assert base.TorchCheckpoints(store.partial("distill", key) / "checkpoint.pt").load()["iteration"] == 2

    notes = Notes()
    run_jobs(store, cfg, plan, {"distill"}, notes)
    assert any("resuming DataDAM from checkpoint at iteration 2/4" in n for n in notes.lines)

    fresh = Store(tmp_path / "fresh")
    fresh_plan = plan_for(fresh, cfg)
    run_jobs(fresh, cfg, fresh_plan, {"distill"})
    assert fresh_plan.keys["distill"] == key
    resumed = load_arrays(store.path("distill", key) / "synthetic.zarr")["images"]
    uninterrupted = load_arrays(fresh.path("distill", key) / "synthetic.zarr")["images"]
    assert np.isfinite(resumed).all() and resumed.tobytes() == uninterrupted.tobytes()


def test_class_shards_make_the_unsharded_set(tmp_path: Path):
    settings = [*TINY, "model.width=16", "ipc=2", "distill.iterations=3"]
    whole, split = Store(tmp_path / "whole"), Store(tmp_path / "split")
    cfg = load_config("digits-datadam", settings)
    plan = plan_for(whole, cfg)
    run_jobs(whole, cfg, plan, {"distill"})
    sharded = load_config("digits-datadam", [*settings, "compute.shards=3"])
    sharded_plan = plan_for(split, sharded)
    run_jobs(split, sharded, sharded_plan, {"distill"})
    key = plan.keys["distill"]
    assert sharded_plan.keys["distill"] == key
    images = [
        load_arrays(store.path("distill", key) / "synthetic.zarr")["images"] for store in (whole, split)
    ]
    assert images[0].tobytes() == images[1].tobytes()
