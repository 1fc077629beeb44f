"""Expert recipes of issue 12: FTD's GSAM experts and PAD's difficulty-ordered expert data.

The GSAM step and the EL2N score are checked against the formulas computed here on an independent
code path (torch.autograd on a flat parameter vector, numpy); the schedule against PAD's own
``linear_cl_scheduler_acse`` and buffer_CL.py's phases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from condense import difficulty
from condense import experts as experts_module
from condense.config import DSAConfig, ExpertScheduleConfig, ExpertsConfig, ModelConfig
from condense.configure import load_config
from condense.errors import ConfigError, DivergenceError
from condense.gsam import GSAM, BatchReplay
from condense.stages import make_plan
from condense.stages.dataset import prepare
from condense.store import Store, load_arrays
from condense.training import drawn_batches, train_epoch
from tests.conftest import TINY, plan_for, run_jobs

SMALL = ModelConfig(width=16)

# ----------------------------------------------------------------------------- GSAM


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _expected_gsam_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, rho: float, alpha: float, adaptive: bool
) -> torch.Tensor:
    """w - lr * (g_adv - alpha * g_perp), by hand on the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_at(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def grad_at(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.clone().requires_grad_(True)
        return torch.autograd.grad(loss_at(flat), flat)[0]

    g = grad_at(w)
    e = rho * w**2 * g / (w.abs() * g).norm() if adaptive else rho * g / g.norm()
    g_adv = grad_at(w + e)
    cosine = (g @ g_adv) / (g.norm() * g_adv.norm())
    g_perp = g - cosine * g.norm() * g_adv / g_adv.norm()
    return w - lr * (g_adv - alpha * g_perp)


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_gsam_step_is_the_formula(adaptive: bool):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    lr, rho, alpha = 0.1, 0.5, 0.4
    model = _mlp()
    expected = _expected_gsam_update(model, x, y, lr, rho, alpha, adaptive)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    replay = BatchReplay(model, model, F.cross_entropy)
    optimizer = GSAM(torch.optim.SGD(model.parameters(), lr=lr), rho, alpha, adaptive, closure=replay.closure)
    loss = replay.loss(replay.forward(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.testing.assert_close(after, expected, rtol=0, atol=1e-12)
    # Sensitive to the recipe: plain SGD (the gradient at w) lands elsewhere.
    sgd = _mlp()
    F.cross_entropy(sgd(x), y).backward()
    plain = before - lr * torch.cat([p.grad.reshape(-1) for p in sgd.parameters()])
    assert (after - plain).abs().max() > 1e-4


def test_gsam_replays_the_augmented_batch_the_loop_drew(digits30):
    """Both gradients of a step see the same DSA draw: the closure's forward gets the very tensor."""
    model = experts_module.student_model(digits30, SMALL, seed=0)
    seen: list[torch.Tensor] = []

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs)
        return model(inputs)

    cfg = ExpertsConfig(optimizer="gsam", batch_size=100)
    optimizer, replay_forward, loss_fn = experts_module.expert_optimizer(model, cfg, forward)
    train_epoch(
        model,
        digits30.train_x,
        digits30.train_y,
        loss_fn,
        optimizer,
        cfg.batch_size,
        torch.Generator().manual_seed(0),
        DSAConfig(),
        replay_forward,
    )
    assert len(seen) == 2 * 3  # 300 images in batches of 100, two evaluations each
    assert all(seen[i] is seen[i + 1] for i in range(0, len(seen), 2))
    assert not torch.equal(seen[0], digits30.train_x[: len(seen[0])])  # augmented, not raw


def test_a_gsam_expert_differs_from_the_sgd_one_and_learns(digits30):
    sgd_cfg = ExpertsConfig(num_experts=1, epochs=4, batch_size=64)
    gsam_cfg = sgd_cfg.model_copy(update={"optimizer": "gsam"})
    sgd = experts_module.train_expert(digits30, SMALL, sgd_cfg, DSAConfig(), seed=1)
    gsam = experts_module.train_expert(digits30, SMALL, gsam_cfg, DSAConfig(), seed=1)
    again = experts_module.train_expert(digits30, SMALL, gsam_cfg, DSAConfig(), seed=1)
    np.testing.assert_array_equal(gsam.params[0], sgd.params[0])  # same initialisation
    assert np.abs(gsam.params[-1] - sgd.params[-1]).max() > 1e-5
    np.testing.assert_array_equal(gsam.params, again.params)  # deterministic
    assert gsam.train_loss[-1] < gsam.train_loss[0]
    assert gsam.epoch_sizes == [len(digits30.train_y)] * 4


def test_a_diverging_expert_is_a_divergence_error_naming_the_setting(digits30):
    """A CondenseError: one line from the CLI, a failed cell (not a stopped table) in a comparison."""
    cfg = ExpertsConfig(num_experts=1, epochs=2, batch_size=64, lr=1e12)
    with pytest.raises(DivergenceError, match="expert 1 diverged at epoch 1; lower experts.lr"):
        experts_module.train_expert(digits30, SMALL, cfg, DSAConfig(), seed=1)


# ----------------------------------------------------------------------------- EL2N and the order


def test_el2n_is_the_distance_of_the_softmax_to_the_one_hot_label():
    model = nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.copy_(torch.arange(12.0).view(4, 3) / 10 - 0.5)
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, -1.0, 1.0]])
    y = torch.tensor([2, 0, 3])
    logits = x.numpy() @ model.weight.detach().numpy().T + model.bias.detach().numpy()
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.linalg.norm(probs - np.eye(4)[y.numpy()], axis=1)
    np.testing.assert_allclose(difficulty.el2n(model(x).detach(), y, 4).numpy(), expected, rtol=1e-6)


def test_the_order_is_class_by_class_from_easy_to_hard():
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1])
    scores = torch.tensor([0.9, 0.5, 0.1, 0.2, 0.5, 0.7, 0.1])
    order = difficulty.difficulty_order(scores, labels, 2)
    assert order.counts == [3, 4]
    assert order.indices.tolist() == [3, 1, 5, 2, 6, 4, 0]  # ties keep index order (2 before 6)


# ----------------------------------------------------------------------------- the schedule


def _pad_window(e: int, s: ExpertScheduleConfig) -> tuple[float, float]:
    """buffer_CL.py's phases with its utils_cl_scheduler.linear_cl_scheduler_acse, as written there."""
    if e <= s.add_end_epoch:
        return 0.0, min(1, 1.0 * s.init_ratio + (1 - s.init_ratio) * 1.0 * e / s.add_end_epoch)
    if s.add_end_epoch < e <= s.rm_epoch_first:
        return 0.0, 1.0
    if s.rm_epoch_first < e <= s.rm_epoch_second:
        return s.rm_easy_ratio_first, 1.0
    return s.rm_easy_ratio_second, 1.0


def test_the_schedule_is_pads():
    s = ExpertScheduleConfig()  # PAD's README: 0.75, 20, 40, 60, 0.1, 0.2
    assert difficulty.epoch_window(s, 0) == (0.0, 0.75)
    assert difficulty.epoch_window(s, 10) == (0.0, 0.875)
    assert difficulty.epoch_window(s, 20) == (0.0, 1.0)
    assert difficulty.epoch_window(s, 21) == difficulty.epoch_window(s, 40) == (0.0, 1.0)
    assert difficulty.epoch_window(s, 41) == difficulty.epoch_window(s, 60) == (0.1, 1.0)
    assert difficulty.epoch_window(s, 61) == difficulty.epoch_window(s, 99) == (0.2, 1.0)
    for e in range(100):
        assert difficulty.epoch_window(s, e) == _pad_window(e, s)
    # Slices of each class's own count: int(0.75 * 10) = 7 and int(0.75 * 7) = 5 at epoch 0.
    order = difficulty.DifficultyOrder(torch.arange(17), [10, 7])
    assert difficulty.epoch_indices(order, s, 0).tolist() == [*range(7), *range(10, 15)]
    assert difficulty.epoch_indices(order, s, 61).tolist() == [*range(2, 10), *range(11, 17)]


def test_schedule_settings_are_validated_in_one_line():
    on = load_config("digits-mtt", ["experts.schedule=true"]).experts.schedule
    assert on == ExpertScheduleConfig()
    assert load_config("digits-mtt", ["experts.schedule.init_ratio=0.5"]).experts.schedule.init_ratio == 0.5
    assert load_config("digits-mtt").experts.schedule is None
    for bad, words in [
        ("experts.schedule.init_ratio=1.5", "less than or equal to 1"),
        ("experts.schedule.rm_easy_ratio_first=-0.1", "greater than or equal to 0"),
        ("experts.schedule.add_end_epoch=50", "add_end_epoch <= rm_epoch_first <= rm_epoch_second"),
        ("experts.schedule.rm_epoch_second=30", "add_end_epoch <= rm_epoch_first <= rm_epoch_second"),
        ("experts.optimizer=adam", "'sgd' or 'gsam'"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config("digits-mtt", [bad])
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_scheduled_expert_trains_on_exactly_the_scheduled_indices(digits30, monkeypatch):
    schedule = ExpertScheduleConfig(
        init_ratio=0.5,
        add_end_epoch=1,
        rm_epoch_first=1,
        rm_epoch_second=2,
        rm_easy_ratio_first=0.2,
        rm_easy_ratio_second=0.5,
    )
    cfg = ExpertsConfig(num_experts=1, epochs=4, batch_size=64, dsa=False, schedule=schedule)
    scores = torch.rand(len(digits30.train_y), generator=torch.Generator().manual_seed(0))
    order = difficulty.difficulty_order(scores, digits30.train_y, digits30.num_classes)
    seen: list[torch.Tensor] = []

    def recording(data, idx, *args, **kwargs):
        seen.append(idx)
        return drawn_batches(data, idx, *args, **kwargs)

    monkeypatch.setattr(experts_module, "drawn_batches", recording)
    trajectory = experts_module.train_expert(digits30, SMALL, cfg, DSAConfig(), seed=0, order=order)

    # Independently: per class, the easiest (lowest score) slice of its 30 images.
    y, s = digits30.train_y.numpy(), scores.numpy()
    ranked = [np.flatnonzero(y == c)[np.argsort(s[y == c], kind="stable")] for c in range(10)]
    windows = [(0, 15), (0, 30), (6, 30), (15, 30)]  # 0.5 easiest, all, drop 0.2, drop 0.5
    for epoch, (start, stop) in enumerate(windows):
        picked = np.concatenate([r[start:stop] for r in ranked])
        assert seen[epoch].tolist() == picked.tolist()
    assert trajectory.epoch_sizes == [150, 300, 240, 150]


def test_a_schedule_needs_the_order(digits30):
    cfg = ExpertsConfig(num_experts=1, epochs=1, schedule=ExpertScheduleConfig())
    with pytest.raises(ValueError, match="difficulty order"):
        experts_module.train_expert(digits30, SMALL, cfg, DSAConfig(), seed=0)


# ----------------------------------------------------------------------------- the stages


def test_the_difficulty_stage_is_planned_only_with_the_schedule_and_keys_what_it_should(tmp_path: Path):
    store = Store(tmp_path)

    def plan(*overrides: str):
        cfg = load_config("digits-mtt", list(overrides))
        return make_plan(cfg, store, prepare(cfg.dataset, store, cfg.ipc)[0])

    off, on = plan(), plan("experts.schedule=true")
    assert "difficulty" not in off.stages()
    assert on.stages().index("difficulty") < on.stages().index("experts")
    assert on.keys["dataset"] == off.keys["dataset"]
    assert on.keys["experts"] != off.keys["experts"]
    experts_job = next(j for j in on.jobs if j.stage == "experts" and j.part is None)
    assert experts_job.keys["difficulty"] == on.keys["difficulty"]
    # GSAM re-keys the experts, not the scores; rho only matters to GSAM experts.
    gsam = plan("experts.schedule=true", "experts.optimizer=gsam")
    assert gsam.keys["difficulty"] == on.keys["difficulty"] and gsam.keys["experts"] != on.keys["experts"]
    assert plan("experts.rho=0.5").keys["experts"] == off.keys["experts"]
    assert (
        plan("experts.optimizer=gsam", "experts.rho=0.5").keys["experts"]
        != plan("experts.optimizer=gsam").keys["experts"]
    )
    # The schedule's phases shape the experts, not the scores.
    later = plan("experts.schedule.init_ratio=0.5")
    assert later.keys["difficulty"] == on.keys["difficulty"] and later.keys["experts"] != on.keys["experts"]


def test_difficulty_and_scheduled_experts_run_through_the_store(tmp_path: Path):
    schedule = [
        "experts.schedule.init_ratio=0.5",
        "experts.schedule.add_end_epoch=2",
        "experts.schedule.rm_epoch_first=2",
        "experts.schedule.rm_epoch_second=2",
        "experts.schedule.rm_easy_ratio_second=0.25",
        "experts.schedule.el2n_epochs=1",
    ]
    cfg = load_config("digits-mtt", [*TINY, "experts.num_experts=1", "model.width=16", *schedule])
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"difficulty", "experts"})

    key = str(plan.keys["difficulty"])
    stored = difficulty.load_order(store, key)
    scores = torch.from_numpy(load_arrays(store.path("difficulty", key) / difficulty.ORDER)["scores"])
    assert stored.counts == [20] * 10 and sorted(stored.indices.tolist()) == list(range(200))
    for run in stored.by_class():  # easy to hard, scores in [0, sqrt(2)]
        assert torch.all(scores[run][1:] >= scores[run][:-1])
    assert float(scores.min()) >= 0 and float(scores.max()) <= 2**0.5
    assert float(scores.max() - scores.min()) > 0.1  # real differences in difficulty, not one value
    meta = store.meta("experts", str(plan.keys["experts"]))
    # epochs 0, 1, 2: 10/20 -> 15/20 -> 20/20 per class; epoch 3: all but the easiest 5 of 20
    assert meta["parts"][0]["epoch_sizes"] == [100, 150, 200, 150]
