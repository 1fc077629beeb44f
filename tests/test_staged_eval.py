"""PDD's staged evaluation (``evaluate.recipe: staged``): a set's stages (:class:`Stages`), stored with
the set and exported with it, and one network trained on S_1, then S_1 + S_2, ..., each stage with a
new SGD at its own step size that goes on from the previous stage's momentum."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from condense import artifacts, evaluate
from condense.config import DatasetConfig, DSAConfig, ModelConfig, PipelineConfig
from condense.configure import load_config
from condense.convert import write_image_folder
from condense.distilled import load_distilled
from condense.errors import CondenseError, ConfigError
from condense.evaluate import Recipe, fit, train_staged
from condense.export import MANIFEST, write_distilled
from condense.models import build_model
from condense.prepare import PreparedDataset, load
from condense.progress import SILENT
from condense.stages import evaluate as evaluate_stage
from condense.stages.dataset import prepare
from condense.store import Store
from condense.synthetic import Stages, SyntheticSet
from tests.conftest import fake_key

MODEL = ModelConfig(width=16)
RECIPE = Recipe(epochs=2, lr=0.01, batch_size=8, momentum=0.9, weight_decay=5e-4, dsa=DSAConfig())
STAGES = Stages((1, 2), (0.02, 0.005))
SMALL = ["compute.device=cpu", "dataset.train_per_class=20", "evaluate.seeds=2", "evaluate.mask_ratios=[]"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    store = Store(tmp_path_factory.mktemp("staged-eval"))
    key, _ = prepare(DatasetConfig(train_per_class=20), store, 1)
    return load(store, key)


def _noise_set(ipc: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-major set of ``ipc`` Gaussian 8x8 digit-shaped images per class."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10 * ipc, 1, 8, 8, generator=g), torch.arange(10).repeat_interleave(ipc)


# ------------------------------------------------------------------ the stages


def test_each_stage_adds_its_images_within_every_class_block():
    assert STAGES.total == 3 and len(STAGES) == 2
    # Class-major, 3 images a class: stage 1 is the first of each class's block, stage 2 the rest.
    assert STAGES.upto(1, 2).tolist() == [0, 3]
    assert STAGES.upto(2, 2).tolist() == [0, 1, 2, 3, 4, 5]
    assert Stages([1, 1], np.array([0.1, 0.2])) == Stages((1, 1), (0.1, 0.2))  # plain tuples whatever came in
    for bad in [((1, 2), (0.1,)), ((0, 2), (0.1, 0.2)), ((), ())]:
        with pytest.raises(ValueError):
            Stages(*bad)
    with pytest.raises(ValueError):
        STAGES.upto(3, 2)


# ------------------------------------------------------------------ training stage by stage


def _by_hand(digits: PreparedDataset, x: torch.Tensor, y: torch.Tensor, carry: bool) -> torch.nn.Module:
    """PDD's loop written out with :func:`fit`: the seeded network, one generator, stage 1's images,
    then stages 1 and 2's at the second stage's step size, with (``carry``) or without the momentum."""
    model = build_model("convnet", 1, 10, 8, MODEL, seed=7)
    generator = torch.Generator().manual_seed(7)
    first = torch.tensor([0, 3, 6, 9, 12, 15, 18, 21, 24, 27])  # each class's first image
    _, optimizer = fit(model, x[first], y[first], dataclasses.replace(RECIPE, lr=0.02), generator)
    state = optimizer.state if carry else None
    fit(model, x, y, dataclasses.replace(RECIPE, lr=0.005), generator, state=state)
    return model


def test_staged_training_is_fit_stage_after_stage_with_the_momentum_carried(digits):
    x, y = _noise_set(3)
    model, loss = train_staged("convnet", digits, x, y, STAGES, RECIPE, seed=7, model_cfg=MODEL)
    assert np.isfinite(loss)
    by_hand = _by_hand(digits, x, y, carry=True)
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(p, q), name

    # The momentum really carries: the second stage started from zero momentum ends elsewhere.
    fresh = _by_hand(digits, x, y, carry=False)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))

    # A fixed lr (evaluate.lr a number) trains every stage at the recipe's.
    fixed, _ = train_staged("convnet", digits, x, y, STAGES, RECIPE, 7, MODEL, learned_lr=False)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), fixed.parameters(), strict=True))

    tested = evaluate.train_and_test_staged("convnet", digits, x, y, STAGES, RECIPE, 7, MODEL)
    assert tested["accuracy"] == evaluate.tested(model, digits)["accuracy"]
    with pytest.raises(ValueError, match="cannot be 10 classes"):
        train_staged("convnet", digits, x[:20], y[:20], STAGES, RECIPE, 7, MODEL)


def test_fit_refuses_a_state_over_another_models_parameters():
    x, y = _noise_set(1)
    one, other = (build_model("convnet", 1, 10, 8, MODEL, seed=s) for s in (1, 2))
    _, optimizer = fit(one, x, y, RECIPE, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not over this model's parameters"):
        fit(other, x, y, RECIPE, torch.Generator().manual_seed(0), state=optimizer.state)


# ------------------------------------------------------------------ storage and export


def _stored(store: Store, name: str, stages: Stages | None) -> str:
    x, y = _noise_set(3)
    key = fake_key(name)
    with store.writing("distill", key) as work:
        artifacts.save_synthetic(work, SyntheticSet(x, y, lr=0.01, stages=stages), x.clamp(0, 1))
        store.commit("distill", key, work, {"lr": 0.01})
    return key


def test_stages_round_trip_through_the_store(tmp_path):
    store = Store(tmp_path)
    staged_key, plain_key = _stored(store, "staged", STAGES), _stored(store, "plain", None)
    loaded = artifacts.load_synthetic(store, staged_key)
    assert loaded.stages == STAGES and loaded.arrays == {}  # not mistaken for a method's own arrays
    assert artifacts.stages_of(artifacts.load_synthetic_arrays(store, staged_key)) == STAGES
    assert artifacts.load_synthetic(store, plain_key).stages is None  # a set without stages, as before


def _export(folder, stages: Stages | None) -> None:
    x, y = _noise_set(3)
    pixels = x.clamp(0, 1).numpy()
    manifest = {"method": "pdd", "ipc": 3, "classes": [str(c) for c in range(10)], "source_fingerprint": "f"}
    write_distilled(folder, x.numpy(), pixels, y.numpy(), None, manifest, stages=stages)


def test_stages_round_trip_through_the_export(tmp_path):
    _export(tmp_path / "staged", STAGES)
    loaded = load_distilled(tmp_path / "staged")
    assert loaded.stages == STAGES
    assert loaded.manifest["stages"] == {"ipc": [1, 2], "lrs": [0.02, 0.005]}
    out = write_image_folder(tmp_path / "staged", tmp_path / "folder")
    assert json.loads((out / "labels.json").read_text())["stages"] == {"ipc": [1, 2], "lrs": [0.02, 0.005]}

    _export(tmp_path / "plain", None)  # as every set exported before stages
    plain = load_distilled(tmp_path / "plain")
    assert plain.stages is None and "stages" not in plain.manifest
    assert "stages" not in json.loads(
        (write_image_folder(tmp_path / "plain", tmp_path / "f2") / "labels.json").read_text()
    )

    manifest_path = tmp_path / "staged" / MANIFEST
    for bad, message in [
        ({"ipc": [1, 1], "lrs": [0.1, 0.1]}, "add up to 2 images per class"),
        ({"ipc": [1, 2], "lrs": [0.1]}, "one finite step size per stage"),
        ({"ipc": [1.5, 1.5], "lrs": [0.1, 0.1]}, "positive whole numbers"),
        ([1, 2], "must be"),
    ]:
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "stages": bad}))
        with pytest.raises(CondenseError, match=message) as refused:
            load_distilled(tmp_path / "staged")
        assert "\n" not in str(refused.value)


# ------------------------------------------------------------------ config and the stage


def test_staged_evaluation_of_a_method_without_stages_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="carry no stages: use it with pdd") as refused:
        load_config("digits-mtt", [*SMALL, "evaluate.recipe=staged"])
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="evaluate.optimizer applies to the mtt recipe"):
        load_config("digits-mtt", [*SMALL, "evaluate.recipe=staged", "evaluate.optimizer=adam"])


def _staged_config(*overrides: str) -> tuple[PipelineConfig, PipelineConfig]:
    """A config evaluated by ``staged``, built past methods.configure (no method here has stages)."""
    cfg = load_config("digits-mtt", [*SMALL, *overrides])
    return cfg, cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"recipe": "staged"})})


def test_only_the_distilled_set_is_keyed_and_named_staged():
    mtt, staged = _staged_config()
    for params in evaluate_stage.instances(staged):
        subject = params["subject"]
        mine, theirs = evaluate_stage.config(staged, params), evaluate_stage.config(mtt, params)
        if subject == "distilled":
            assert mine["recipe"] == {**theirs["recipe"], "recipe": "staged"}
            assert evaluate_stage.evaluation_name(staged, subject) == "staged"
        else:  # the baselines train by the mtt recipe: the same keys, shared with an mtt run
            assert mine == theirs
            assert evaluate_stage.evaluation_name(staged, subject) == "mtt"


def test_the_stage_trains_the_stored_set_stage_by_stage(tmp_path, digits):
    store = Store(tmp_path)
    _, cfg = _staged_config("evaluate.epochs=2", "evaluate.batch_size=8")
    seeds = [evaluate_stage.eval_seed(cfg, i) for i in (0, 1)]

    def context(key: str) -> SimpleNamespace:
        return SimpleNamespace(
            cfg=cfg,
            store=store,
            keys={"distill": key},
            device=torch.device("cpu"),
            params={"subject": "distilled", "arch": "convnet", "indices": [0, 1]},
            progress=SILENT,
            data=lambda: digits,
        )

    outcome = evaluate_stage.run(context(_stored(store, "staged", STAGES)))
    x, y = _noise_set(3)
    run_recipe = evaluate_stage.recipe(cfg, "distilled", None)
    for run, seed in zip(outcome["runs"], seeds, strict=True):
        alone = evaluate.train_and_test_staged("convnet", digits, x, y, STAGES, run_recipe, seed, cfg.student)
        assert run["seed"] == seed and run["accuracy"] == alone["accuracy"]

    with pytest.raises(ConfigError, match="carries no stages") as refused:
        evaluate_stage.run(context(_stored(store, "plain", None)))
    assert "\n" not in str(refused.value)
