"""Every method on a streamed dataset. Draws by index read the same images from both paths, so given
the same inputs (experts, teacher, seed) a method distils the same set streamed as in memory; expert
trajectories and difficulty scores train on streamed epochs; a whole streamed pipeline runs MTT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from condense import teacher
from condense.artifacts import ExpertBuffer
from condense.config import DSAConfig, ExpertScheduleConfig, ExpertsConfig, ModelConfig, TeacherConfig
from condense.configure import load_config
from condense.datasets.generate import write_shards
from condense.difficulty import difficulty_order, el2n_scores
from condense.errors import ConfigError
from condense.experts import train_expert
from condense.methods import get_method
from condense.methods.base import DistillInputs
from condense.progress import SILENT
from condense.stages.plan import check_streamable
from condense.store import Store
from tests.conftest import memory_and_stream, run_pipeline
from tests.test_matching import MemoryCheckpoints

MODEL = ModelConfig(width=8)
DSA = DSAConfig()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 40 training and 10 test images of 12 px, 50 samples a shard."""
    return write_shards(tmp_path_factory.mktemp("gen") / "shards", 4, 40, 10, 12, per_shard=50)


@pytest.fixture(scope="module")
def both(shards: Path, tmp_path_factory: pytest.TempPathFactory):
    return memory_and_stream(shards, tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def buffer(both) -> ExpertBuffer:
    """Two short expert trajectories, recorded on the in-memory data and given to both paths."""
    memory, _ = both
    cfg = ExpertsConfig(num_experts=2, epochs=3, batch_size=32, lr=0.01)
    trajectories = [train_expert(memory, MODEL, cfg, DSA, seed=s).params for s in range(2)]
    return ExpertBuffer(np.stack(trajectories))


def _distil_both(both, name: str, settings: dict[str, Any], **extra: Any):
    method = get_method(name)
    cfg = method.config_cls(**settings)
    return [
        method.distill(DistillInputs(data, 2, 0, cfg, MODEL, DSA, **extra), MemoryCheckpoints(), SILENT)
        for data in both
    ]


TRAJECTORY = {"iterations": 3, "syn_steps": 3, "expert_epochs": 1, "checkpoint_every": 2}
WINDOW = {"min_start_epoch": 0, "initial_max_start_epoch": 1, "max_start_epoch": 2}


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("mtt", TRAJECTORY | {"max_start_epoch": 2}),
        ("datm", TRAJECTORY | WINDOW),  # real images the experts classify correctly, learned labels
        ("pad", TRAJECTORY | WINDOW | {"shallow_fraction": 0.5}),
    ],
)
def test_trajectory_methods_distil_the_same_set_streamed(both, buffer, name, settings):
    memory_set, stream_set = _distil_both(both, name, settings, experts=buffer)
    assert torch.equal(memory_set.images, stream_set.images)
    if memory_set.label_logits is not None:
        assert torch.equal(memory_set.label_logits, stream_set.label_logits)
    # The images did move from their real start (the same run, not two untouched copies).
    assert memory_set.history and memory_set.history[-1]["iteration"] == 3


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("dm", {"iterations": 3, "batch_real": 8}),
        ("dsa", {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8}),
        # DREAM's representative batches: per-class features of every member, clustered each step;
        # its k-means initialisation reads the same way.
        ("dream", {"base": "dm", "iterations": 3, "batch_real": 5, "interval": 1, "init": "kmeans"}),
    ],
)
def test_matching_methods_distil_the_same_set_streamed(both, name, settings):
    memory_set, stream_set = _distil_both(both, name, settings | {"checkpoint_every": 2})
    assert torch.equal(memory_set.images, stream_set.images)
    if name == "dream":
        assert memory_set.stats["reclusters"] == stream_set.stats["reclusters"] > 0


def test_cudd_picks_and_recovers_the_same_set_streamed(both):
    memory, _ = both
    trained = teacher.train_teacher(
        memory, TeacherConfig(source="train", epochs=2, batch_size=32, dsa=False), MODEL, DSA, seed=0
    )
    settings = {"iterations": 3, "crop": False, "flip": False, "jitter": 0, "r_bn": 0.1}
    settings |= {"curricula": [1, 1], "student_epochs": 1, "min_teacher_accuracy": 0}
    memory_set, stream_set = _distil_both(both, "cudd", settings, teacher=trained.model)
    assert torch.equal(memory_set.images, stream_set.images)
    # The second curriculum's picks used a student's right/wrong over the whole streamed split.
    assert memory_set.stats["curricula"] == stream_set.stats["curricula"]
    assert len(stream_set.stats["curricula"]) == 2


def test_experts_train_on_streamed_epochs_and_a_difficulty_schedule_reads_only_its_slice(both):
    memory, stream = both
    cfg = ExpertsConfig(num_experts=1, epochs=3, batch_size=32, lr=0.01)
    streamed = train_expert(stream, MODEL, cfg, DSA, seed=0)
    assert streamed.train_loss[-1] < streamed.train_loss[0]
    assert streamed.test_accuracy > 40  # four classes: chance is 25
    assert streamed.epoch_sizes == [160] * 3

    schedule = ExpertScheduleConfig(el2n_models=1, el2n_epochs=1)
    scores = el2n_scores(stream, MODEL, cfg, schedule, DSA, seed=0)
    assert scores.shape == (160,) and bool((scores > 0).all())
    order = difficulty_order(scores, stream.train_y, stream.num_classes)
    scheduled = cfg.model_copy(update={"schedule": schedule})
    # A scheduled epoch is a draw by index, so both paths train on the very same batches.
    on_stream = train_expert(stream, MODEL, scheduled, DSA, seed=0, order=order)
    in_memory = train_expert(memory, MODEL, scheduled, DSA, seed=0, order=order)
    np.testing.assert_array_equal(on_stream.params, in_memory.params)
    assert on_stream.epoch_sizes[0] < 160  # the first epochs see the easy part only


def test_a_streamed_pipeline_runs_mtt_end_to_end(shards: Path, tmp_path: Path):
    cfg = load_config(
        "digits-mtt",
        [
            "dataset.source=webdataset",
            f"dataset.path={shards}",
            "dataset.load=stream",
            "dataset.workers=0",
            "dataset.zca=true",  # the whitening fitted on the stream, applied per batch
            "model.width=8",
            "experts.num_experts=2",
            "experts.epochs=4",
            "distill.iterations=4",
            "distill.syn_steps=4",
            "distill.max_start_epoch=2",
            "ipc=2",
            "evaluate.epochs=50",
            "evaluate.seeds=1",
            "evaluate.full_data_epochs=20",
        ],
    )
    summary = run_pipeline(Store(tmp_path / "store"), cfg)
    assert summary["accuracy"]["convnet"]["mean"] > 40  # four classes: chance is 25
    assert summary["baselines"]["full_data"]["mean"] > 40


def test_a_method_that_does_not_declare_streaming_is_refused_before_any_work(tmp_path: Path):
    from tests.test_custom_method import CONFIG  # registers test-class-means, which reads train_x

    config = tmp_path / "class-means.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with pytest.raises(ConfigError, match="method test-class-means .* read the whole training split"):
        check_streamable(load_config(str(config)))
