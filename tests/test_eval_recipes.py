"""The papers' own evaluations beside the standard one: DD's replay of the steps it learned
(``evaluate.recipe: replay``) and the Adam that RaT-BPTT and AT-BPTT distil with (``evaluate.optimizer:
adam``); at their neutral values nothing about the standard evaluation moves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from condense import artifacts, evaluate
from condense.augment import dsa
from condense.config import DatasetConfig, DSAConfig, ModelConfig, keyed
from condense.configure import load_config
from condense.errors import ConfigError
from condense.evaluate import Recipe, train_and_test, train_and_test_replay, train_and_test_seeds
from condense.methods import dd
from condense.methods.base import DistillInputs
from condense.methods.bptt import Inner, LearnedStepGD, train_plain
from condense.models import FlatParams, build_model
from condense.prepare import PreparedDataset, load
from condense.progress import SILENT
from condense.stages import evaluate as evaluate_stage
from condense.stages.dataset import prepare
from condense.store import Store
from condense.synthetic import StepSchedule
from condense.training import random_seed
from tests.conftest import plan_for, run_pipeline
from tests.test_matching import MemoryCheckpoints

MODEL = ModelConfig(width=16)
SMALL = [
    "compute.device=cpu",
    "dataset.train_per_class=20",
    "experts.num_experts=1",
    "experts.epochs=2",
    "distill.iterations=4",
    "distill.batch_real=64",
    "distill.checkpoint_every=2",
    "evaluate.seeds=2",
    "evaluate.epochs=10",
    "evaluate.full_data=false",
    "evaluate.mask_ratios=[]",
]
"""A digits run of a BPTT method in seconds (ratbptt adds its unroll below)."""
SMALL_RAT = [*SMALL, "distill.unroll=6", "distill.window=3", "distill.window_every=2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    store = Store(tmp_path_factory.mktemp("eval-recipes"))
    key, _ = prepare(DatasetConfig(train_per_class=20), store, 1)
    return load(store, key)


def _noise_set(ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-major set of ``ipc`` Gaussian 8x8 digit-shaped images per class."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10 * ipc, 1, 8, 8, generator=g), torch.arange(10).repeat_interleave(ipc)


# ------------------------------------------------------------------ DD's replay


def test_replay_trains_exactly_the_stored_schedule_as_dd_distilled_for(digits):
    ipc = 2
    x, y = _noise_set(ipc, seed=0)
    steps = dd.schedule(10, ipc, 1, epochs=2)
    raw_lrs = torch.randn(len(steps), generator=torch.Generator().manual_seed(1)) - 4
    schedule = StepSchedule(torch.stack([s.indices for s in steps]), F.softplus(raw_lrs))
    model, _ = evaluate.train_replay("convnet", digits, x, y, schedule, seed=7, model_cfg=MODEL)

    # By hand: plain gradient descent, step i on its images with its step size, in order.
    net = build_model("convnet", 1, 10, 8, MODEL, seed=7)
    params = {name: p.detach() for name, p in net.named_parameters()}
    for idx, size in zip(schedule.indices, schedule.step_sizes.tolist(), strict=True):

        def loss(p: dict[str, torch.Tensor], idx: torch.Tensor = idx) -> torch.Tensor:
            return F.cross_entropy(functional_call(net, p, (x[idx],)), y[idx])

        grads = torch.func.grad(loss)(params)
        params = {name: params[name] - size * grads[name] for name in params}
    # Equal up to float rounding (the convolution's gradient sums in another order under torch.func).
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[name], rtol=1e-5, atol=1e-7, msg=name)

    # And DD's own inner loop (the network its outer loss was measured on) ends at the same weights.
    flat = FlatParams(build_model("convnet", 1, 10, 8, MODEL, seed=7))
    inner = Inner(flat, flat.flatten(), steps, LearnedStepGD(raw_lrs))
    torch.testing.assert_close(train_plain(inner, x, y, len(steps)).state[0], flat.flatten(model))

    again = train_and_test_replay("convnet", digits, x, y, schedule, seed=7, model_cfg=MODEL)
    assert again["accuracy"] == evaluate.tested(model, digits)["accuracy"]


def test_a_known_init_set_carries_the_seeds_of_its_fixed_networks(digits, monkeypatch):
    built = []

    def recording(data: PreparedDataset, model_cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
        built.append(seed)
        return build_model("convnet", data.channels, data.num_classes, data.resolution, model_cfg, seed)

    monkeypatch.setattr(dd, "student_model", recording)
    cfg = dd.DDConfig(iterations=2, init="known", networks=2, batch_real=32)
    schedule = dd.distill(
        DistillInputs(digits, 1, 0, cfg, MODEL, DSAConfig()), MemoryCheckpoints(), SILENT
    ).schedule
    assert schedule is not None and schedule.init_seeds is not None
    # The networks DD built for its fixed initialisations (after the one it takes the shapes from).
    assert schedule.init_seeds.tolist() == built[-2:] and len(set(built[-2:])) == 2


def test_replay_of_a_set_without_a_schedule_is_refused_in_one_line_when_the_config_is_built():
    with pytest.raises(ConfigError, match="sets carry none") as refused:
        load_config("digits-ratbptt", [*SMALL_RAT, "evaluate.recipe=replay"])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["evaluate.recipe=kd", "evaluate.optimizer=adam"], "evaluate.optimizer applies to the mtt recipe"),
        (["evaluate.recipe=replay", "evaluate.labels=soft"], "a replayed schedule trains on hard labels"),
        (
            ["evaluate.recipe=replay", "distill.init=known", "evaluate.models=[convnet,resnet18]"],
            "starts from the networks it was distilled for",
        ),
    ],
)
def test_evaluations_that_cannot_apply_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load_config("digits-dd", overrides)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------ the optimiser


Update = Callable[[list[torch.Tensor], torch.Tensor, int, float], list[torch.Tensor]]


def _sgd(momentum: float, weight_decay: float) -> Update:
    """torch.optim.SGD's step written out: b = mu b + (g + wd theta) (b = g first), theta -= lr b."""

    def step(state: list[torch.Tensor], grad: torch.Tensor, i: int, lr: float) -> list[torch.Tensor]:
        theta, velocity = state
        grad = grad + weight_decay * theta
        velocity = grad if i == 0 else momentum * velocity + grad
        return [theta - lr * velocity, velocity]

    return step


def _adam(weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Update:
    """torch.optim.Adam's step written out, L2 weight decay added to the gradient."""

    def step(state: list[torch.Tensor], grad: torch.Tensor, i: int, lr: float) -> list[torch.Tensor]:
        theta, m, v = state
        grad = grad + weight_decay * theta
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
        m_hat, v_hat = m / (1 - betas[0] ** (i + 1)), v / (1 - betas[1] ** (i + 1))
        return [theta - lr * m_hat / (v_hat.sqrt() + eps), m, v]

    return step


def _train_by_hand(
    digits: PreparedDataset, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int, update: Update
) -> torch.nn.Module:
    """The recipe's training loop written out: the seeded network, each epoch's batch order and each
    batch's DSA seed from one generator, the learning rate /10 after half the epochs."""
    net = FlatParams(build_model("convnet", 1, 10, 8, MODEL, seed))
    theta = net.flatten()
    state = [theta] + [torch.zeros_like(theta)] * (2 if recipe.optimizer == "adam" else 1)
    generator, step = torch.Generator().manual_seed(seed), 0
    for epoch in range(recipe.epochs):
        lr = recipe.lr * (0.1 if epoch >= recipe.epochs // 2 else 1.0)
        for idx in torch.randperm(len(x), generator=generator).split(recipe.batch_size):
            assert recipe.dsa is not None
            batch = dsa(x[idx], recipe.dsa, random_seed(generator))
            theta = state[0].requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(net(theta, batch), y[idx]), theta)
            state = update([theta.detach(), *state[1:]], grad, step, lr)
            step += 1
    return net.load_into(state[0])


RECIPE = Recipe(epochs=4, lr=0.01, batch_size=8, momentum=0.9, weight_decay=5e-4, dsa=DSAConfig())
ADAM = Recipe(
    epochs=4, lr=0.001, batch_size=8, momentum=0.9, weight_decay=5e-4, dsa=DSAConfig(), optimizer="adam"
)


@pytest.mark.parametrize(
    ("recipe", "update"),
    # Adam with weight decay: without it the convolutions' biases, which instance norm cancels, get
    # gradients of rounding noise alone, which Adam scales to whole steps, different for any summation order.
    [(RECIPE, _sgd(0.9, 5e-4)), (ADAM, _adam(5e-4))],
    ids=["sgd", "adam"],
)
def test_the_recipe_trains_with_its_optimiser_as_written_out_by_hand(digits, recipe, update):
    x, y = _noise_set(2, seed=3)
    model, _ = evaluate.train_mtt("convnet", digits, x, y, recipe, seed=5, model_cfg=MODEL)
    by_hand = _train_by_hand(digits, x, y, recipe, 5, update)
    flat = FlatParams(by_hand)
    torch.testing.assert_close(flat.flatten(model), flat.flatten(by_hand), rtol=1e-5, atol=1e-6)
    single = train_and_test("convnet", digits, x, y, recipe, seed=5, model_cfg=MODEL)
    assert single["accuracy"] == evaluate.tested(by_hand, digits)["accuracy"]


def test_adam_trains_stacked_seeds_as_it_trains_each_alone(digits, monkeypatch):
    sets = [_noise_set(2, seed=s) for s in (3, 4)]
    xs, ys, seeds = [x for x, _ in sets], [y for _, y in sets], [5, 6]
    alone = [
        train_and_test("convnet", digits, x, y, ADAM, s, MODEL) for x, y, s in zip(xs, ys, seeds, strict=True)
    ]

    def not_alone(*args: object, **kwargs: object) -> None:
        raise AssertionError("the seeds were trained one at a time, not stacked")

    monkeypatch.setattr(evaluate, "train_and_test", not_alone)
    together = train_and_test_seeds("convnet", digits, xs, ys, ADAM, seeds, MODEL)
    for stacked, own in zip(together, alone, strict=True):
        assert stacked["accuracy"] == own["accuracy"]
        assert stacked["train_loss"] == pytest.approx(own["train_loss"], rel=1e-4)


# ------------------------------------------------------------------ keys


def test_neutral_options_leave_every_key_and_recipe_as_they_were(tmp_path):
    store = Store(tmp_path)
    plain = load_config("digits-dd", SMALL)
    neutral = load_config(
        "digits-dd", [*SMALL, "evaluate.recipe=mtt", "evaluate.optimizer=sgd", "evaluate.adam_lr=0.001"]
    )
    keys = plan_for(store, plain).keys
    assert plan_for(store, neutral).keys == keys
    dumped = neutral.evaluate.model_dump()
    assert keyed(neutral.evaluate) == {k: v for k, v in dumped.items() if k not in ("optimizer", "adam_lr")}
    params = evaluate_stage.instances(neutral)
    assert all("optimizer" not in evaluate_stage.config(neutral, p)["recipe"] for p in params)
    assert all(evaluate_stage.recipe(neutral, p["subject"], 0.02).optimizer == "sgd" for p in params)

    # Adam is another evaluation of every set; replay another of the distilled set alone (its
    # baselines train by the mtt recipe, under the same keys, so they are shared).
    adam = plan_for(store, load_config("digits-dd", [*SMALL, "evaluate.optimizer=adam"])).keys
    assert adam["distill"] == keys["distill"] and not set(adam["evaluate"]) & set(keys["evaluate"])
    replay = plan_for(store, load_config("digits-dd", [*SMALL, "evaluate.recipe=replay"])).keys
    shared = [a == b for a, b in zip(replay["evaluate"], keys["evaluate"], strict=True)]
    assert shared == [p["subject"] != "distilled" for p in params]


# ------------------------------------------------------------------ end to end on digits


def _report(summary: dict) -> str:
    return (Path(summary["artifacts"]["run_dir"]) / "report.md").read_text()


def test_dd_replayed_end_to_end_reports_its_evaluation_and_replays_its_stored_schedule(tmp_path):
    store = Store(tmp_path)
    cfg = load_config("digits-dd", [*SMALL, "evaluate.recipe=replay"])
    summary = run_pipeline(store, cfg)
    assert summary["evaluation_recipe"] == "replay"
    assert summary["evaluation"] == {"distilled": "replay", "random_real": "mtt"}
    assert "evaluation recipe: replay" in _report(summary)

    synthetic = artifacts.load_synthetic(store, summary["keys"]["distill"])
    schedule = synthetic.schedule
    assert schedule is not None and schedule.init_seeds is None
    steps = dd.schedule(10, 1, cfg.distill.images_per_step, cfg.distill.epochs)
    assert torch.equal(schedule.indices, torch.stack([s.indices for s in steps]))
    assert float(schedule.step_sizes.mean()) == pytest.approx(summary["distill_stats"]["step_size_mean"])
    # What the stage reported is the stored set replayed from each seed's fresh network.
    data = load(store, summary["keys"]["dataset"])
    replayed = [
        train_and_test_replay(
            "convnet",
            data,
            synthetic.images,
            synthetic.labels,
            schedule,
            evaluate_stage.eval_seed(cfg, i),
            cfg.student,
        )["accuracy"]
        for i in range(cfg.evaluate.seeds)
    ]
    assert summary["accuracy"]["convnet"]["runs"] == [round(a, 2) for a in replayed]


def test_ratbptt_under_adam_end_to_end_reports_its_evaluation(tmp_path):
    store = Store(tmp_path)
    cfg = load_config("digits-ratbptt", [*SMALL_RAT, "evaluate.optimizer=adam", "evaluate.weight_decay=0"])
    summary = run_pipeline(store, cfg)
    assert summary["evaluation_recipe"] == "mtt+adam"
    assert summary["evaluation"] == {"distilled": "mtt+adam", "random_real": "mtt+adam"}
    assert "evaluation recipe: mtt+adam" in _report(summary)
    assert len(summary["accuracy"]["convnet"]["runs"]) == cfg.evaluate.seeds  # one Adam run per seed
    # A set with no schedule stored loads as before: no schedule, nothing else changed.
    assert artifacts.load_synthetic(store, summary["keys"]["distill"]).schedule is None
