"""PDD (condense/methods/pdd.py, condense/stages/progressive.py): a set distilled in stages, each
stage's earlier images frozen, the experts regenerated between stages as jobs of their own, and the
staged evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from condense import artifacts
from condense.config import DatasetConfig
from condense.configure import load_config
from condense.errors import ConfigError
from condense.evaluate import Recipe, fit
from condense.methods import get_method
from condense.methods.base import DistillInputs
from condense.methods.initial import initial_images
from condense.methods.pdd import SYNTHETIC_BATCH, UNLEARNED_LR, class_major
from condense.models import FlatParams
from condense.prepare import load, load_once
from condense.stages import base
from condense.stages.dataset import prepare
from condense.stages.progressive import NAME
from condense.store import Store, load_arrays
from condense.synthetic import Stages, SyntheticSet
from condense.training import derived_seed, student_model
from tests.conftest import TINY, KillAfter, Notes, plan_for, run_jobs, run_pipeline
from tests.test_matching import MODEL as MATCHING_MODEL
from tests.test_matching import TINY as MATCHING_TINY
from tests.test_matching import MemoryCheckpoints

STAGED = [*TINY, "ipc=2", "distill.stages=2", "distill.synthetic_epochs=3"]


def _config(*extra: str):
    return load_config("digits-pdd", [*STAGED, *extra])


def _links(plan) -> list[tuple[dict, str]]:
    """(params, key) of each progressive job of the plan, in plan order (parts left out)."""
    return [(job.params, job.key) for job in plan.jobs if job.stage == NAME and job.part is None]


def test_the_plan_chains_sets_and_regenerated_experts(tmp_path: Path):
    plan = plan_for(Store(tmp_path), _config("distill.stages=2", "ipc=4"))
    links = _links(plan)
    assert [(p["stage"], p["link"]) for p, _ in links] == [(1, "set"), (1, "experts"), (2, "set")]
    (_, first), (_, experts), (_, second) = links
    # One part job per regenerated expert, each waiting for stage 1's set.
    parts = [job for job in plan.jobs if job.stage == NAME and job.part is not None]
    assert len(parts) == 2 and all(job.key == experts for job in parts)
    assert all(any(first in name for name in plan.after[job.name]) for job in parts)
    # Stage 2 reads stage 1's set and the regenerated experts, by key; the distill job the last set.
    stage2 = next(job for job in plan.jobs if job.key == second)
    assert stage2.keys[NAME] == [first, experts]
    distill = next(job for job in plan.jobs if job.stage == "distill")
    assert distill.keys[NAME] == [first, experts, second]


def test_the_regeneration_s_settings_rekey_the_experts_and_what_follows_not_stage_1(tmp_path: Path):
    store = Store(tmp_path)
    a = [key for _, key in _links(plan_for(store, _config()))]
    b = [key for _, key in _links(plan_for(store, _config("distill.synthetic_epochs=4")))]
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    c = [key for _, key in _links(plan_for(store, _config("distill.iterations=5")))]
    assert all(x != y for x, y in zip(a, c, strict=True))
    assert a == [key for _, key in _links(plan_for(store, _config()))]


def test_an_ipc_that_does_not_split_into_the_stages_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="ipc 3 does not split into distill.stages=2"):
        load_config("digits-pdd", [*STAGED, "ipc=3"])


def test_the_class_major_order_puts_each_class_s_earlier_images_first():
    # 2 classes: earlier stages hold 2 a class (h0 h0 h1 h1), this stage adds 1 (n0 n1).
    order = class_major(torch.zeros(6), 2, 2, 1)
    assert order.tolist() == [0, 1, 4, 2, 3, 5]


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory: pytest.TempPathFactory):
    store = Store(tmp_path_factory.mktemp("pdd"))
    cfg = _config("evaluate.recipe=staged")
    summary = run_pipeline(store, cfg)
    return store, cfg, plan_for(store, cfg), summary


def test_the_earlier_stage_s_images_do_not_move_in_the_next_stage(staged_run):
    store, cfg, plan, _ = staged_run
    (_, first), _, (_, second) = _links(plan)
    one = artifacts.load_synthetic(store, first, NAME)
    two = artifacts.load_synthetic(store, second, NAME)
    assert one.stages.ipc == (1,) and two.stages.ipc == (1, 1)
    classes = 10
    kept = two.images[two.stages.upto(1, classes)]
    assert torch.equal(kept, one.images)  # bit-identical
    assert torch.equal(two.labels[two.stages.upto(1, classes)], one.labels)
    new = two.images.view(classes, 2, *two.images.shape[1:])[:, 1]
    assert not torch.equal(new, one.images)
    # Each stage learned its own step size; the distilled set is the last stage's, with both.
    final = artifacts.load_synthetic(store, plan.keys["distill"])
    assert torch.equal(final.images, two.images)
    assert final.stages == two.stages and final.stages.lrs[0] == one.stages.lrs[0]


def test_a_regenerated_expert_first_trains_on_exactly_the_stage_s_images(staged_run):
    store, cfg, plan, _ = staged_run
    (_, first), (_, experts), _ = _links(plan)
    union = artifacts.load_synthetic(store, first, NAME)
    original = artifacts.load_buffer(store, plan.keys["experts"])
    regenerated = artifacts.load_buffer(store, experts, NAME)
    assert regenerated.num_experts == cfg.experts.num_experts
    assert regenerated.num_snapshots == cfg.distill.max_start_epoch + cfg.distill.expert_epochs + 1
    data = load_once(store, plan.keys["dataset"], cfg.dataset, torch.device("cpu"))
    for index in range(regenerated.num_experts):
        seed = derived_seed(cfg.seed, 1, index)
        model = student_model(data, cfg.model, seed)
        FlatParams(model).load_into(original.snapshot(index, 0))
        recipe = Recipe(
            cfg.distill.synthetic_epochs, union.stages.lrs[0], SYNTHETIC_BATCH, 0.9, 5e-4, cfg.dsa
        )
        fit(model, union.images, union.labels, recipe, torch.Generator().manual_seed(seed))
        assert torch.equal(regenerated.snapshot(index, 0), FlatParams(model).flatten())
        assert not torch.equal(regenerated.snapshot(index, 0), original.snapshot(index, 0))


def test_the_summary_names_the_staged_evaluation_of_the_set_and_not_of_its_baselines(staged_run):
    _, _, _, summary = staged_run
    assert summary["evaluation"]["distilled"] == "staged"
    assert summary["evaluation"]["random_real"] == "mtt"


def test_a_stage_killed_mid_way_resumes_to_identical_bytes(tmp_path: Path, monkeypatch):
    cfg = _config()
    store = Store(tmp_path / "killed")
    plan = plan_for(store, cfg)
    (_, first), (_, experts), (_, second) = _links(plan)
    before = [job for job in plan.jobs if job.key in (first, experts) or job.stage == "experts"]
    for job in before:
        base.execute(job, cfg, store)
    stage2 = next(job for job in plan.jobs if job.key == second)
    original = base.TorchCheckpoints
    with monkeypatch.context() as patch:
        patch.setattr(base, "TorchCheckpoints", lambda path, *hook: KillAfter(original(path, *hook), 1))
        with pytest.raises(KeyboardInterrupt):
            base.execute(stage2, cfg, store)
    assert not store.has(NAME, second)
    notes = Notes()
    base.execute(stage2, cfg, store, notes)
    assert any("resuming MTT from checkpoint at iteration 2/6" in n for n in notes.lines)
    resumed = load_arrays(store.path(NAME, second) / "synthetic.zarr")

    fresh = Store(tmp_path / "fresh")
    run_jobs(fresh, cfg, plan_for(fresh, cfg), {"experts", NAME})
    uninterrupted = load_arrays(fresh.path(NAME, second) / "synthetic.zarr")
    for name in ("images", "labels", "stage_ipc", "stage_lr"):
        assert (resumed[name] == uninterrupted[name]).all(), name


# ----------------------------------------------------------------------------- over the matching methods

# PDD over DM, IDC-style: a DM preset made PDD (the mtt preset's trajectory settings do not apply).
# The teacher is trained, not the best expert, so nothing in the plan needs experts at all.
MATCHING = [
    "compute.device=cpu",
    "dataset.train_per_class=20",
    "method=pdd",
    "distill.base=dm",
    "distill.stages=2",
    "ipc=2",
    "distill.iterations=4",
    "distill.batch_real=8",
    "distill.checkpoint_every=2",
    "teacher.source=train",
    "teacher.epochs=1",
    "evaluate.seeds=2",
    "evaluate.epochs=20",
    "evaluate.full_data_epochs=2",
    "evaluate.recipe=staged",
    "evaluate.lr=learned",
]


def test_pdd_over_dm_chains_the_stage_sets_alone_and_plans_no_experts(tmp_path: Path):
    cfg = load_config("digits-dm", MATCHING)
    assert type(cfg.distill).__name__ == "PDDOnDM"
    plan = plan_for(Store(tmp_path), cfg)
    links = _links(plan)
    assert [(p["stage"], p["link"]) for p, _ in links] == [(1, "set"), (2, "set")]
    (_, first), (_, second) = links
    assert "experts" not in plan.keys
    assert not any(job.part is not None for job in plan.jobs if job.stage == NAME)
    stage2 = next(job for job in plan.jobs if job.key == second)
    assert stage2.keys[NAME] == [first] and "experts" not in stage2.keys
    distill = next(job for job in plan.jobs if job.stage == "distill")
    assert distill.keys[NAME] == [first, second] and "experts" not in distill.keys
    # synthetic_epochs shapes nothing without experts to regenerate.
    other = plan_for(Store(tmp_path), load_config("digits-dm", [*MATCHING, "distill.synthetic_epochs=7"]))
    assert [key for _, key in _links(other)] == [first, second]


@pytest.fixture(scope="module")
def matching_run(tmp_path_factory: pytest.TempPathFactory):
    store = Store(tmp_path_factory.mktemp("pdd-dm"))
    cfg = load_config("digits-dm", MATCHING)
    summary = run_pipeline(store, cfg)
    return store, cfg, plan_for(store, cfg), summary


def test_pdd_over_dm_keeps_stage_1_bit_for_bit_and_evaluates_stage_by_stage(matching_run):
    store, cfg, plan, summary = matching_run
    (_, first), (_, second) = _links(plan)
    one = artifacts.load_synthetic(store, first, NAME)
    two = artifacts.load_synthetic(store, second, NAME)
    classes = 10
    assert one.stages.ipc == (1,) and two.stages.ipc == (1, 1)
    # DM learns no step size: each stage records the unlearned one, and the set none.
    assert two.stages.lrs == (UNLEARNED_LR, UNLEARNED_LR) and two.lr is None
    assert torch.equal(two.images[two.stages.upto(1, classes)], one.images)  # bit-identical
    assert torch.equal(two.labels, torch.arange(classes).repeat_interleave(2))
    new = two.images.view(classes, 2, *two.images.shape[1:])[:, 1]
    assert not torch.equal(new, one.images)
    final = artifacts.load_synthetic(store, plan.keys["distill"])
    assert torch.equal(final.images, two.images) and final.stages == two.stages
    assert summary["evaluation"]["distilled"] == "staged"
    runs = summary["accuracy"]["convnet"]["runs"]
    assert len(runs) == cfg.evaluate.seeds and all(accuracy > 0 for accuracy in runs)


@pytest.mark.parametrize("name", ["dm", "dsa"])
def test_the_matching_loop_moves_the_new_images_and_never_the_frozen_ones(name: str, tmp_path: Path):
    store = Store(tmp_path)
    key, _ = prepare(DatasetConfig(train_per_class=20), store, 2)
    data = load(store, key)
    classes = data.num_classes
    method = get_method(name)
    cfg = method.config_cls(**MATCHING_TINY[name])
    shape = data.images(torch.arange(1)).shape[1:]
    held = torch.randn(classes * 2, *shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(classes).repeat_interleave(2)
    frozen = SyntheticSet(images=held, labels=labels, stages=Stages((2,), (UNLEARNED_LR,)))
    dsa_cfg = load_config("digits-mtt").dsa
    checkpoints = MemoryCheckpoints()
    inputs = DistillInputs(data, 1, 0, cfg, MATCHING_MODEL, dsa_cfg, frozen=frozen)
    result = method.distill(inputs, checkpoints)
    blocks = result.images.view(classes, 3, *shape)
    assert torch.equal(blocks[:, :2].reshape(held.shape), held)  # bit-identical
    assert torch.equal(result.labels, torch.arange(classes).repeat_interleave(3))
    # Nor did they move during the run: the last checkpoint's pixels are the loop's, not put back.
    assert checkpoints.state is not None
    during = checkpoints.state["images"].view(classes, 3, *shape)
    assert torch.equal(during[:, :2].reshape(held.shape), held)
    start = initial_images(data, 1, cfg.init, torch.Generator().manual_seed(0), lambda seed: None)
    assert not torch.equal(blocks[:, 2], start)  # the new ones moved
    # The frozen images are in their class's batch: without them the new ones end elsewhere.
    alone = method.distill(DistillInputs(data, 1, 0, cfg, MATCHING_MODEL, dsa_cfg), MemoryCheckpoints())
    assert not torch.equal(blocks[:, 2], alone.images)
