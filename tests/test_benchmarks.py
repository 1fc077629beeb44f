"""Each new benchmark's shape, end to end on generated data in its own layout, through the one-command
form (``<dataset>-<method>``, the CPU budget shrunk further): CIFAR-100's shards (100 classes of
32 px), Tiny-ImageNet's official folder (200 classes of 64 px), an ImageNet folder read as MTT's
ImageNette (10 of 12 classes, cropped to 128 px). One method family each: trajectories, matching,
a teacher's selection."""

from __future__ import annotations

import numpy as np
import pytest

import condense
from condense.configure import load_config
from condense.datasets.generate import write_benchmark
from condense.store import Store
from tests.conftest import run_pipeline

pytest.importorskip("webdataset")

SMALL = [
    "compute.device=cpu",
    "model.width=8",
    "dataset.workers=0",
    "evaluate.seeds=1",
    "evaluate.epochs=2",
    "evaluate.full_data_epochs=1",
]
BY_METHOD = {
    "mtt": [
        "experts.num_experts=1",
        "experts.epochs=3",
        "distill.iterations=2",
        "distill.syn_steps=2",
        "distill.expert_epochs=1",
        "distill.max_start_epoch=1",
        "distill.checkpoint_every=1",
    ],
    "dm": ["experts.epochs=1", "distill.iterations=2", "distill.batch_real=2", "distill.checkpoint_every=1"],
    "rded": ["teacher.epochs=10", "teacher.batch_size=16", "distill.candidates=2"],
}
CASES = [
    # (card, method, layout overrides, classes, resolution, the first class names, read from the layout's
    # own list: the shards' classes.txt, Tiny's words.txt, the subset's wnids in MTT's order)
    ("cifar100", "mtt", [], 100, 32, ["class_00", "class_01"]),
    ("tinyimagenet", "dm", ["dataset.source=folder", "dataset.load=memory"], 200, 64, ["thing 0", "thing 1"]),
    ("imagenette", "rded", [], 10, 128, ["n01440764", "n02102040"]),
]


@pytest.mark.parametrize(("card", "method", "layout", "classes", "side", "names"), CASES)
def test_a_new_benchmark_shape_runs_end_to_end(tmp_path, card, method, layout, classes, side, names):
    data = write_benchmark(card, tmp_path / card, train_per_class=3, test_per_class=1)
    overrides = [f"dataset.path={data}", *layout, *SMALL, *BY_METHOD[method]]
    cfg = load_config(f"{card}-{method}", overrides)
    assert (cfg.dataset.name, cfg.method) == (card if card != "tinyimagenet" else "tiny-imagenet", method)

    summary = run_pipeline(Store(tmp_path / "store"), cfg)

    distilled = condense.load_distilled(summary["artifacts"]["run_dir"])
    assert tuple(distilled.images.shape) == (classes * cfg.ipc, 3, side, side)
    assert sorted(np.unique(distilled.labels.numpy()).tolist()) == list(range(classes))
    assert len(distilled.manifest["classes"]) == classes
    assert distilled.manifest["classes"][:2] == names
    # Evaluated as configured: one network per seed on the set and on each baseline.
    assert len(summary["accuracy"]["convnet"]["runs"]) == cfg.evaluate.seeds == 1
    assert set(summary["baselines"]) == {"random_real", "full_data"}
