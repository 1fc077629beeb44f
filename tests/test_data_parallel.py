"""Data-parallel teacher training (``compute.data_parallel``): each batch split across processes,
gradients averaged, the teacher the one-process teacher up to floating-point reduction order; the
count is in no key; a BatchNorm teacher on CPUs is refused before any process starts."""

from __future__ import annotations

import io

import pytest
import torch

from condense import artifacts, devices
from condense.augment import dsa
from condense.config import DSAConfig
from condense.configure import load_config
from condense.errors import ConfigError
from condense.progress import Progress
from condense.stages import execute
from condense.store import Store
from condense.teacher import data_parallel_share
from condense.training import random_seed
from tests.conftest import plan_for

TEACHER = [
    "compute.device=cpu",
    "dataset.train_per_class=30",
    "model.width=16",
    "teacher.epochs=3",
    "teacher.batch_size=32",
    "teacher.norm=instancenorm",
]
TOLERANCE = 1e-5
"""Largest parameter difference allowed after 3 epochs, for weights up to about 1: measured 3e-8 (a
share's loss summed in another order rounds differently, and SGD carries the difference on)."""


@pytest.mark.parametrize("world", [2, 3])
def test_the_shares_of_a_batch_are_the_one_process_batch_augmented_alike(world):
    batches = [(torch.rand(10, 3, 8, 8), torch.arange(10)) for _ in range(3)]
    augment = DSAConfig()
    whole_gen = torch.Generator().manual_seed(5)
    whole = [(dsa(x, augment, random_seed(whole_gen)), y) for x, y in batches]
    shares = [
        list(data_parallel_share(iter(batches), torch.Generator().manual_seed(5), augment, rank, world))
        for rank in range(world)
    ]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([share[step][0] for share in shares]), x)
        assert torch.equal(torch.cat([share[step][1] for share in shares]), y)
        assert {share[step][2] for share in shares} == {10}


def test_process_devices_follow_the_listed_devices_else_the_jobs():
    cpu = torch.device("cpu")
    assert devices.data_parallel(3, None, cpu) == ["cpu", "cpu", "cpu"]
    assert devices.data_parallel("auto", None, cpu) == ["cpu"]
    assert devices.data_parallel("auto", ["cuda:1", "cuda:3"], cpu) == ["cuda:1", "cuda:3"]
    assert devices.data_parallel(1, ["cuda:1", "cuda:3"], cpu) == ["cuda:1"]
    with pytest.raises(ConfigError, match="compute.data_parallel 3 exceeds the 2 listed compute.devices"):
        devices.data_parallel(3, ["cuda:0", "cuda:1"], cpu)


def trained_teacher(store: Store, processes: int) -> tuple[str, dict[str, torch.Tensor], str]:
    """The teacher stage's key, the trained weights, and what it printed."""
    cfg = load_config("digits-rded", [*TEACHER, f"compute.data_parallel={processes}"])
    plan = plan_for(store, cfg)
    job = next(job for job in plan.jobs if job.stage == "teacher")
    printed = io.StringIO()
    execute(job, cfg, store, Progress("teacher", stream=printed, interval=0))
    return job.key, artifacts.load_teacher(store, job.key).state_dict(), printed.getvalue()


def test_a_teacher_trained_on_two_processes_is_the_one_process_teacher(tmp_path):
    key, one, _ = trained_teacher(Store(tmp_path / "one"), 1)
    two_key, two, printed = trained_teacher(Store(tmp_path / "two"), 2)
    assert "training convnet data-parallel on cpu, cpu" in printed
    assert "3/3 teacher loss" in printed and "(2 processes)" in printed
    assert two_key == key  # the process count is in no key
    assert one.keys() == two.keys()
    assert max(float((one[name] - two[name]).abs().max()) for name in one) < TOLERANCE


def test_a_batchnorm_teacher_on_cpus_is_refused_before_any_process_starts(tmp_path):
    cfg = load_config("digits-rded", [*TEACHER, "teacher.norm=batchnorm", "compute.data_parallel=2"])
    store = Store(tmp_path / "store")
    job = next(job for job in plan_for(store, cfg).jobs if job.stage == "teacher")
    with pytest.raises(ConfigError, match="compute.data_parallel on CPUs needs a teacher without BatchNorm"):
        execute(job, cfg, store)
