"""The GPU path, checked on a CPU: every method's first iterations, both trajectory memory modes, the
expert, teacher and evaluation loops (stacked seeds, one network, the KD recipe online and stored),
in memory and streamed, run with the data on :mod:`condense.devicecheck`'s checking device, where a
CPU-built tensor meeting device data fails exactly where it would on CUDA."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from condense import devicecheck, relabel, teacher
from condense.artifacts import ExpertBuffer
from condense.config import DSAConfig, ExpertsConfig, KDRecipeConfig, ModelConfig, TeacherConfig
from condense.datasets.generate import write_shards
from condense.evaluate import KDRecipe, Recipe, train_and_test_kd, train_and_test_seeds
from condense.experts import train_expert
from condense.methods import get_method, method_names, pdd
from condense.methods.base import DistillInputs
from condense.progress import SILENT
from tests.conftest import memory_and_stream
from tests.test_matching import MemoryCheckpoints

MODEL = ModelConfig(width=8)
DEEPER = {"datadam": ModelConfig(width=8, depth=2)}
"""Methods that need more than the one block of 8 px images (DataDAM matches all blocks but the last)."""
DSA = DSAConfig()
TRAJECTORY = {
    "iterations": 2,
    "syn_steps": 3,
    "expert_epochs": 1,
    "max_start_epoch": 1,
    "checkpoint_every": 1,
}
WINDOW = {"min_start_epoch": 0, "initial_max_start_epoch": 1}
RECOVER = {"iterations": 2, "min_teacher_accuracy": 0, "checkpoint_every": 1}
SETTINGS: dict[str, dict[str, Any]] = {
    "mtt": TRAJECTORY,
    "ftd": TRAJECTORY,
    "datm": TRAJECTORY | WINDOW,
    "pad": TRAJECTORY | WINDOW | {"shallow_fraction": 0.5},
    "ast": TRAJECTORY,
    "dm": {"iterations": 2, "batch_real": 8, "checkpoint_every": 1},
    "dsa": {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8, "checkpoint_every": 1},
    "dream": {"iterations": 2, "batch_real": 5, "interval": 1, "init": "kmeans", "checkpoint_every": 1},
    "rded": {},
    "sre2l": RECOVER,
    "cda": RECOVER,
    "cudd": RECOVER | {"curricula": [1, 1], "student_epochs": 1},
    "datadam": {"iterations": 2, "batch_real": 8, "checkpoint_every": 1},
    "dd": {"iterations": 2, "epochs": 1, "batch_real": 8, "checkpoint_every": 1},
    "ratbptt": {"iterations": 2, "unroll": 3, "window": 2, "batch_real": 8, "checkpoint_every": 1},
    "atbptt": {
        "iterations": 2,
        "unroll": 4,
        "window": 2,
        "window_range": 1,
        "batch_real": 8,
        "checkpoint_every": 1,
    },
    "infer": RECOVER,
}
"""Every registered method's first iterations (a new method must add its line)."""
STAGED = {"pdd": TRAJECTORY | {"stages": 2, "synthetic_epochs": 1}}
"""Methods whose stages run as jobs of the progressive stage: checked stage by stage below."""


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory):
    """4 classes x 24 training and 8 test images of 8 px, in memory and streamed."""
    shards = write_shards(tmp_path_factory.mktemp("gen") / "shards", 4, 24, 8, 8, per_shard=40)
    return memory_and_stream(shards, tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def experts(both) -> ExpertBuffer:
    memory, _ = both
    cfg = ExpertsConfig(num_experts=1, epochs=2, batch_size=32)
    return ExpertBuffer(np.stack([train_expert(memory, MODEL, cfg, DSA, seed=s).params for s in range(2)]))


@pytest.fixture(scope="module")
def trained(both) -> torch.nn.Module:
    memory, _ = both
    cfg = TeacherConfig(source="train", epochs=2, batch_size=32, dsa=False)
    return teacher.train_teacher(memory, cfg, MODEL, DSA, seed=0).model


def test_the_checking_device_fails_where_cuda_would_and_counts_host_waits():
    with devicecheck.simulated() as syncs:
        logits = torch.randn(4, 3).to(devicecheck.DEVICE)
        assert logits.device == devicecheck.DEVICE
        with pytest.raises(devicecheck.DeviceMixingError, match="same device"):
            F.cross_entropy(logits, torch.full((4,), 1))  # DSA's targets before the fix
        with pytest.raises(devicecheck.DeviceMixingError, match="generator"):
            torch.randperm(4, generator=torch.Generator(), device=devicecheck.DEVICE)
        syncs.reset()
        loss = F.cross_entropy(logits, torch.full((4,), 1, device=logits.device))
        value = float(loss)  # a value read back: the host waits
        picked = logits[torch.tensor([0, 2])]  # CPU indices: CUDA copies them over
        mask = logits[logits > 0]  # a shape that depends on the data
        host = logits.cpu()
        assert syncs.as_dict() == {"scalar": 1, "to_host": 1, "to_device": 1, "shape": 1, "async_copies": 0}
        # The arithmetic is real: the same numbers as on the CPU.
        assert value == pytest.approx(float(F.cross_entropy(host, torch.full((4,), 1))))
        assert torch.equal(picked.cpu(), host[[0, 2]]) and len(mask) == int((host > 0).sum())
        torch.zeros(3).to(devicecheck.DEVICE, non_blocking=True)
        assert syncs.counts["async_copies"] == 1 and syncs.counts["to_device"] == 1


def test_every_registered_method_has_a_device_check():
    ours = [name for name in method_names() if get_method(name).module.startswith("condense.")]
    assert sorted(SETTINGS | STAGED) == ours


def _distil(data, name: str, experts: ExpertBuffer, trained: torch.nn.Module, **overrides: Any):
    method = get_method(name)
    cfg = method.config_cls(**(SETTINGS[name] | overrides))
    ipc = 2 if name == "cudd" else 1
    with devicecheck.simulated():
        on_device = data.to(devicecheck.DEVICE)
        inputs = DistillInputs(
            on_device,
            ipc,
            0,
            cfg,
            DEEPER.get(name, MODEL),
            DSA,
            experts=experts if "experts" in method.needs else None,
            teacher=copy.deepcopy(trained).to(devicecheck.DEVICE) if "teacher" in method.needs else None,
        )
        return method.distill(inputs, MemoryCheckpoints(), SILENT).images.cpu()


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("where", ["memory", "stream"])
def test_every_method_runs_with_its_data_on_a_device(both, experts, trained, name, where):
    data = both[0] if where == "memory" else both[1]
    if where == "stream" and not get_method(name).streams:
        pytest.skip(f"{name} does not stream")
    images = _distil(data, name, experts, trained)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("where", ["memory", "stream"])
def test_pdd_s_stages_and_regenerated_experts_run_on_a_device(both, experts, where):
    data = both[0] if where == "memory" else both[1]
    cfg = get_method("pdd").config_cls(**STAGED["pdd"])
    with devicecheck.simulated():
        on_device = data.to(devicecheck.DEVICE)
        inputs = DistillInputs(on_device, 2, 0, cfg, MODEL, DSA, experts=experts)
        first = pdd.distill_stage(inputs, 1, MemoryCheckpoints(), SILENT)
        regenerated = pdd.regenerate_expert(
            on_device,
            MODEL,
            ExpertsConfig(num_experts=1, epochs=2),
            DSA,
            experts.snapshot(0, 0),
            first,
            cfg.synthetic_epochs,
            pdd.regenerated_epochs(cfg),
            seed=0,
        )
        buffer = ExpertBuffer(np.stack([regenerated.params] * 2))
        second = pdd.distill_stage(
            replace(inputs, experts=buffer, frozen=first), 2, MemoryCheckpoints(), SILENT
        )
        images = second.images.cpu()
    assert second.stages.ipc == (1, 1) and torch.isfinite(images).all()


def test_the_constant_memory_walk_runs_on_a_device(both, experts, trained):
    images = _distil(both[0], "mtt", experts, trained, memory="constant")
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("where", ["memory", "stream"])
def test_experts_and_the_teacher_train_on_a_device(both, where):
    data = both[0] if where == "memory" else both[1]
    with devicecheck.simulated():
        on_device = data.to(devicecheck.DEVICE)
        trajectory = train_expert(on_device, MODEL, ExpertsConfig(num_experts=1, epochs=2), DSA, seed=0)
        cfg = TeacherConfig(source="train", epochs=1, batch_size=32)
        taught = teacher.train_teacher(on_device, cfg, MODEL, DSA, seed=0)
    assert np.isfinite(trajectory.params).all() and taught.train_accuracy >= 0


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])  # stacked seeds, then one at a time
def test_the_mtt_recipe_evaluates_on_a_device(both, norm):
    memory, stream = both
    recipe = Recipe(epochs=2, lr=0.01, batch_size=8, momentum=0.9, weight_decay=5e-4, dsa=DSA)
    x, y = memory.train_x[::6], memory.train_y[::6]
    with devicecheck.simulated():
        for data in (memory, stream):
            on_device = data.to(devicecheck.DEVICE)
            xs = [x.to(devicecheck.DEVICE)] * 2
            ys = [y.to(devicecheck.DEVICE)] * 2
            model = ModelConfig(width=8, norm=norm)
            results = train_and_test_seeds("convnet", on_device, xs, ys, recipe, [0, 1], model)
            assert len(results) == 2 and all(0 <= r["accuracy"] <= 100 for r in results)
            full = train_and_test_seeds("convnet", on_device, [None], [None], recipe, [0], model)
            assert 0 <= full[0]["accuracy"] <= 100


@pytest.mark.parametrize("mode", ["online", "stored"])
def test_the_kd_recipe_evaluates_on_a_device(both, trained, mode):
    memory, _ = both
    augment = relabel.KDAugment.from_config(KDRecipeConfig())
    recipe = KDRecipe(2, 1e-3, 0.01, 0.0, 8, 4.0, augment)
    x = memory.train_x[::6]
    with devicecheck.simulated():
        on_device = memory.to(devicecheck.DEVICE)
        model = copy.deepcopy(trained).to(devicecheck.DEVICE)
        images = x.to(devicecheck.DEVICE)
        if mode == "online":
            plans = relabel.online_plans(len(x), 8, augment, seed=0, fp16=True)
            targets = relabel.online_labels(model, 4.0, 3, fp16=True)
        else:
            arrays = relabel.relabel(model, images, augment, 2, 8, 4.0, 3, True, seed=0)
            stored = relabel.StoredLabels(arrays, memory.num_classes, 8)
            plans, targets = stored.plan, stored.targets
        result = train_and_test_kd("convnet", on_device, images, recipe, 0, plans, targets, MODEL)
    assert 0 <= result["accuracy"] <= 100


def test_the_checking_device_is_real_arithmetic(both):
    """A method run on the checking device gives the CPU's numbers (it is the CPU underneath)."""
    memory, _ = both
    method = get_method("dm")
    cfg = method.config_cls(**SETTINGS["dm"])
    on_cpu = method.distill(DistillInputs(memory, 1, 0, cfg, MODEL, DSA), MemoryCheckpoints(), SILENT)
    assert torch.equal(_distil(memory, "dm", None, torch.nn.Identity()), on_cpu.images)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("mtt", {}), ("mtt", {"memory": "constant"}), ("datm", {}), ("dm", {}), ("dsa", {}), ("sre2l", {})],
)
def test_a_distillation_iteration_waits_for_the_device_at_most_once(both, experts, trained, name, overrides):
    """Steady state, counted on the checking device: two more iterations add at most two host waits
    (the one read of the iteration's loss), whatever the unroll length or the number of classes.
    Checkpoints (one per checkpoint_every iterations) are left out: they copy the state to the host."""
    memory, _ = both
    method = get_method(name)
    waits = []
    for iterations in (1, 3):
        settings = SETTINGS[name] | overrides | {"iterations": iterations, "checkpoint_every": 1000}
        cfg = method.config_cls(**settings)
        with devicecheck.simulated() as syncs:
            inputs = DistillInputs(
                memory.to(devicecheck.DEVICE),
                1,
                0,
                cfg,
                MODEL,
                DSA,
                experts=experts if "experts" in method.needs else None,
                teacher=copy.deepcopy(trained).to(devicecheck.DEVICE) if "teacher" in method.needs else None,
            )
            method.distill(inputs, MemoryCheckpoints(), SILENT)
            waits.append(syncs.total)
    assert waits[1] - waits[0] <= 2, syncs.as_dict()


@pytest.mark.parametrize("zca", [False, True])
def test_a_dataset_is_prepared_on_the_device_once_per_process(tmp_path, monkeypatch, zca):
    from condense import prepare as preparing
    from condense.config import DatasetConfig
    from condense.stages.dataset import prepare
    from condense.store import Store

    store = Store(tmp_path)
    cfg = DatasetConfig(train_per_class=5, zca=zca)
    key, _ = prepare(cfg, store, 1)
    on_cpu = preparing.load(store, key, cfg)
    reads = []
    real_load = preparing.load
    monkeypatch.setattr(preparing, "load", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(preparing, "_resident", {})
    with devicecheck.simulated() as syncs:
        first = preparing.load_once(store, key, cfg, devicecheck.DEVICE)
        again = preparing.load_once(store, key, cfg, devicecheck.DEVICE)
        # Pixels travel as bytes and become inputs there: no blocking copy on the way.
        assert syncs.counts["to_device"] == 0 and syncs.counts["async_copies"] == 8
        assert again is first and len(reads) == 1
        assert first.train_x.device.type == devicecheck.DEVICE.type
        # The device's inputs are the CPU's (whitened or normalised there, from the same bytes).
        torch.testing.assert_close(first.train_x.cpu(), on_cpu.train_x, rtol=1e-5, atol=1e-5)
        assert torch.equal(first.test_y.cpu(), on_cpu.test_y)
    # Another device, or another key, is another copy; the oldest beyond the bound is let go.
    preparing.load_once(store, key, cfg, torch.device("cpu"))
    assert len(reads) == 2 and len(preparing._resident) == preparing.RESIDENT_DATASETS
